"""The dataset run behind ``nti invert``: every image of a folder or list inverted once, resumable, sharded.

``launch`` (Fabric and rank processes) → ``worker`` (one rank's shard through the slot engine) with
``items`` (the stream), ``outputs`` (files per image), ``manifest`` (one JSON row per image),
``checkpoint`` (the engine's state), ``lock`` (one run per folder), ``signals`` (stop and resume).
"""

from importlib import import_module

_EXPORTS = {
    "OutputMismatchError": "identity",
    "RankFailedError": "launch",
    "run_inversion": "launch",
    "OutputLockedError": "lock",
    "ManifestIndex": "nti_lightning.store.manifest",
    "read_manifest": "nti_lightning.store.manifest",
    "RunSummary": "outputs",
    "format_header": "outputs",
    "format_row": "outputs",
    "EXIT_PREEMPTED": "nti_lightning.exit_codes",
    "StopFlag": "signals",
}


def __getattr__(name: str):  # lazy: ``nti status`` reads manifests without importing torch
    if name in _EXPORTS:
        where = _EXPORTS[name]
        return getattr(import_module(where if "." in where else f"nti_lightning.run.{where}"), name)
    raise AttributeError(f"module 'nti_lightning.run' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
