"""Launching ``nti invert``: Fabric, the rank processes, and what happens when one of them stops or fails.

``run_inversion`` is the entry point. Under srun/torchrun every rank is started by the cluster and runs
``worker.run_worker`` on its shard; where this process launches the other ranks itself (Lightning's ``ddp``
without srun/torchrun, or ``ddp_spawn``) it passes stop signals on to them and waits for them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from nti_lightning.config import RunConfig
from nti_lightning.engine.runtime import resolve_precision
from nti_lightning.exit_codes import EXIT_ALL_FAILED, EXIT_PREEMPTED, EXIT_SOME_FAILED
from nti_lightning.run.outputs import RunSummary
from nti_lightning.run.signals import StopFlag
from nti_lightning.run.worker import log_line, run_worker, summary_path, worker_name


def fabric_precision_kwargs(precision: str, on_cpu: bool) -> dict:
    """Fabric's precision arguments: 16-mixed on CPU as an explicit fp16 plugin with a CPU GradScaler (Fabric
    would silently run bf16), any other precision by name."""
    if precision == "16-mixed" and on_cpu:
        from lightning.fabric.plugins import MixedPrecision

        return {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    return {"precision": precision}


def make_fabric(cfg: RunConfig, launch: bool = True):
    """Fabric for ``cfg.trainer``; 16-mixed on CPU gets an explicit fp16 plugin (Fabric would run bf16)."""
    from datetime import timedelta

    import lightning as L
    from lightning.fabric.strategies import DDPStrategy
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    tr = cfg.trainer
    on_cpu = tr.accelerator == "cpu" or (tr.accelerator == "auto" and not torch.cuda.is_available())
    kwargs = fabric_precision_kwargs(tr.precision, on_cpu)
    strategy = tr.strategy
    if strategy in ("ddp", "ddp_spawn"):
        strategy = DDPStrategy(
            start_method="popen" if strategy == "ddp" else "spawn", timeout=timedelta(seconds=tr.ddp_timeout_s)
        )
    try:
        fabric = L.Fabric(
            accelerator=tr.accelerator, devices=tr.devices, num_nodes=tr.num_nodes, strategy=strategy, **kwargs
        )
    except (RuntimeError, MisconfigurationException) as e:  # no such accelerator here, too many devices, …
        first = str(e).strip().splitlines()[0]
        raise ValueError(
            f"trainer.accelerator={tr.accelerator} trainer.devices={tr.devices}: {first} "
            "(trainer.accelerator=auto picks what this machine has)"
        ) from None
    if launch:
        fabric.launch()
    return fabric


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Output, inputs, captions and a local model path made absolute: ``config.yaml`` is then usable from any
    folder, and every rank sees the same paths whatever its working directory."""

    def absolute(p: str | None) -> str | None:
        return None if p is None else str(Path(p).expanduser().resolve())

    data = replace(cfg.data, images=[absolute(p) for p in cfg.data.images] if cfg.data.images else cfg.data.images,
                   captions=absolute(cfg.data.captions))  # fmt: skip
    spec = cfg.model.spec
    if spec != "tiny" and Path(spec).expanduser().exists():
        spec = absolute(spec)
    return replace(cfg, output=replace(cfg.output, dir=absolute(cfg.output.dir)), data=data,
                   model=replace(cfg.model, spec=spec))  # fmt: skip


def run_inversion(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    retry_failed: bool = False,
    quiet: bool = False,
    fabric=None,
) -> RunSummary:
    """Inverts every image of ``cfg.data`` into ``cfg.output.dir``; returns this rank's summary (rank 0's
    under ``ddp_spawn``). ``summary.preempted``: a signal stopped the run with its state saved.

    Where this process launches the other ranks itself (``trainer.strategy=ddp`` without srun/torchrun, or
    ``ddp_spawn``) it passes stop signals on to them and waits for them: the summary is ``preempted`` if any
    rank was, and ``RankFailedError`` is raised if any rank failed."""
    cfg = absolute_paths(cfg)
    if Path(cfg.output.dir).exists() and not Path(cfg.output.dir).is_dir():
        raise NotADirectoryError(f"output folder {cfg.output.dir} is a file; give a folder (--output / output.dir)")
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    if precision != cfg.trainer.precision:  # "auto": record the mode that actually runs
        cfg = replace(cfg, trainer=replace(cfg.trainer, precision=precision))
    if fabric is not None:
        return _run_rank(fabric, cfg, overwrite, retry_failed, quiet)
    stop = StopFlag()  # before the launch: a signal then reaches the ranks this process starts
    since = time.time()
    try:
        if cfg.trainer.strategy == "ddp_spawn":
            return _run_spawned(cfg, stop, overwrite, retry_failed, quiet, since)
        fabric = make_fabric(cfg)
        launcher = getattr(fabric.strategy, "launcher", None)
        procs = list(getattr(launcher, "procs", None) or [])  # Lightning's own `ddp` launch; none under srun
        stop.forward(lambda: [p.pid for p in procs if p.returncode is None])
        ranks: dict[int, subprocess.Popen] = {}

        def take_over() -> None:  # after the start-up barrier: every rank is up and no collective follows
            ranks.update(take_over_launched_ranks(fabric))

        try:
            summary = _run_rank(fabric, cfg, overwrite, retry_failed, quiet, stop=stop, on_started=take_over)
        except BaseException:
            # this rank failed: the ranks it launched must not run on alone (before the start-up barrier they
            # have done nothing yet and wait in it: kill them; after it, let them save first)
            stop_ranks(procs, grace_s=30.0 if ranks else 0.0)
            raise
        if ranks:
            _note(cfg, fabric.global_rank, quiet, f"waiting for the rank(s) {sorted(ranks)} this process launched")
            settle_ranks(summary, {r: p.wait() for r, p in ranks.items()})
            merge_rank_summaries(summary, cfg, ranks, since)
        return summary
    finally:
        stop.restore()


def _run_spawned(
    cfg: RunConfig, stop: StopFlag, overwrite: bool, retry_failed: bool, quiet: bool, since: float
) -> RunSummary:
    """``ddp_spawn``: this process starts every rank; each reports its outcome in shared memory, since Lightning
    returns rank 0's summary only."""
    import multiprocessing

    import torch.multiprocessing as mp

    fabric = make_fabric(cfg, launch=False)
    outcomes = mp.get_context("spawn").Array("i", [-1] * fabric.world_size, lock=False)
    stop.forward(lambda: [p.pid for p in multiprocessing.active_children()])
    summary = fabric.launch(_run_rank, cfg, overwrite, retry_failed, quiet, None, outcomes)
    settle_ranks(summary, dict(enumerate(outcomes)))
    merge_rank_summaries(summary, cfg, range(1, fabric.world_size), since)
    return summary


def take_over_launched_ranks(fabric) -> dict[int, subprocess.Popen]:
    """The rank processes that Lightning's ``ddp`` (popen) launcher started from this one, by global rank (none
    under srun/torchrun: the cluster starts every rank). This process watches them from now on instead of
    Lightning's child-process observer, which SIGKILLs the launcher as soon as a child exits non-zero — with
    ``EXIT_PREEMPTED`` too, while this rank is still saving its own state."""
    procs = getattr(getattr(fabric.strategy, "launcher", None), "procs", None)
    if not procs:
        return {}
    ranks = {fabric.global_rank + i: p for i, p in enumerate(procs, 1)}
    procs.clear()  # the observer holds this very list: empty, it has nothing left to watch and ends
    return ranks


class RankFailedError(RuntimeError):
    """A rank launched by this process ended with an error (its ``logs/rank{r}.log`` says more)."""


def settle_ranks(summary: RunSummary, codes: dict[int, int]) -> None:
    """Folds the outcomes of the ranks this process launched into its summary: ``preempted`` if any rank stopped
    on a signal (exit 75, or killed by the signal before its handler was installed), an error if any failed."""
    preempted = {EXIT_PREEMPTED, *(-s for s in StopFlag.SIGNALS)}
    completed = {0, EXIT_SOME_FAILED, EXIT_ALL_FAILED}  # a rank whose images failed still finished its share
    failed = {r: c for r, c in codes.items() if c not in completed and c not in preempted}
    summary.preempted = summary.preempted or any(c in preempted for c in codes.values())
    if failed:
        raise RankFailedError(
            f"rank(s) {sorted(failed)} failed (exit codes {failed}; a negative code is the signal that killed it); "
            f"see {summary.output}/logs/rank*.log. Finished images are recorded; rerun to complete the rest."
        )


def merge_rank_summaries(summary: RunSummary, cfg: RunConfig, ranks, since: float) -> None:
    """Adds the final counts the ranks this process launched left in ``logs/`` (written after ``since``): the
    launching rank prints one summary of the whole run."""
    for r in ranks:
        path = summary_path(summary.output, cfg, r)
        if r != summary.rank and path.is_file() and path.stat().st_mtime >= since:
            summary.merge(RunSummary.load(path, summary.output))


def stop_ranks(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM (they save and exit), then SIGKILL what is still running after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.terminate() if grace_s > 0 else p.kill()
    end = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()


def _note(cfg: RunConfig, rank: int, quiet: bool, line: str) -> None:
    """A line for this rank's log file (and stderr unless quiet), outside the worker."""
    with open(Path(cfg.output.dir) / "logs" / f"{worker_name(cfg, rank)}.log", "a", encoding="utf-8") as f:
        f.write(log_line(line))
    if not quiet:
        print(line, file=sys.stderr, flush=True)


def _run_rank(
    fabric,
    cfg: RunConfig,
    overwrite: bool,
    retry_failed: bool,
    quiet: bool,
    stop: StopFlag | None = None,
    outcomes=None,
    on_started: Callable[[], None] | None = None,
) -> RunSummary:
    from nti_lightning.models import load_model

    out_dir = Path(cfg.output.dir).resolve()
    own_stop = stop is None
    stop = stop if stop is not None else StopFlag()
    try:
        summary = run_worker(fabric, cfg, out_dir, stop, overwrite, retry_failed, quiet, load_model, on_started)
    finally:
        if own_stop:
            stop.restore()
    if outcomes is not None:  # ddp_spawn: this rank's outcome for the launching process
        outcomes[fabric.global_rank] = EXIT_PREEMPTED if summary.preempted else 0
    return summary
