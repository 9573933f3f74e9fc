"""The run layer: what every command's job (``nti invert``, ``nti eval``, ``nti edit --edits``) stands on.

``folder`` (a worker's view of its run folder: claims, settings, the start-up handshake) with ``claim`` (one run
per folder and shard, held by every rank), ``checkpoint`` (a worker's engine state through Lightning's
``CheckpointIO``), ``launch`` (ranks as independent processes, Fabric per rank), ``signals`` (stop, preempt, die
with the launcher), ``progress`` (logging and the bar), ``job`` (the frame a job's worker runs in), ``summary``
(a worker's counts) and ``status`` (``nti status``). Records go to ``store.records`` (the append-only record log
and the compact index that commits it), files through ``store.files.atomic_write``.
"""

from importlib import import_module

_EXPORTS = {
    "OutputMismatchError": "folder",
    "OutputLockedError": "claim",
    "RankFailedError": "launch",
    "RunSummary": "summary",
    "StopFlag": "signals",
    "read_manifest": "nti_lightning.store.manifest",
    "EXIT_PREEMPTED": "nti_lightning.exit_codes",
}


def __getattr__(name: str):  # lazy: ``nti status`` reads the index without importing torch
    if name in _EXPORTS:
        where = _EXPORTS[name]
        return getattr(import_module(where if "." in where else f"nti_lightning.run.{where}"), name)
    raise AttributeError(f"module 'nti_lightning.run' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
