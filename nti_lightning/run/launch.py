"""Launching a job's ranks: every rank is an independent process with its own device and its own shard.

Ranks never exchange anything (each inverts its own images), so no process group is made. Where a rank stands
comes from the launcher, read through Lightning's cluster environments: ``srun`` (``SLURMEnvironment``),
``torchrun`` (``TorchElasticEnvironment``), or ``nti`` itself — with ``trainer.devices`` > 1 and no cluster
launcher, the first process runs rank 0 and starts ranks 1…G−1 as ``nti`` subprocesses of the same command
line (``NTI_RANK`` …), passes stop signals on to them, waits for them, and reports the whole run. A started rank
dies with its launcher (``signals.die_with_launcher``) and every rank holds its own claim, so no rank outlives
a killed run to race a rerun. Each rank's Fabric is a single-device one: it supplies the device, precision and
the checkpoint I/O (``checkpoint.WorkerCheckpointIO``).

Why not Lightning's own ``ddp`` launcher: it makes a process group the ranks never use, and its child-process
observer SIGKILLs every rank as soon as one exits non-zero — also with 75 after a preemption, while the others
are still saving (``tests/run/test_launch_limits.py`` pins it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from nti_lightning.exit_codes import EXIT_ALL_FAILED, EXIT_PREEMPTED, EXIT_SOME_FAILED
from nti_lightning.run.signals import StopFlag
from nti_lightning.run.summary import RunSummary


@dataclass(frozen=True)
class Placement:
    """Where this process stands: its rank of ``world``, its device index on the node, the session its ranks
    share (the start-up handshake names it), the pid of the ``nti`` process that started it (if one did)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    session: str = ""
    launcher_pid: int | None = None
    environment: str = "a single process"


class RankFailedError(RuntimeError):
    """A rank launched by this process ended with an error (its ``logs/<worker>.log`` says more)."""


def local_device_count(trainer) -> int:
    """How many devices of this node the run uses (``trainer.devices``: an int, a list, or "auto")."""
    devices = trainer.devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if devices in ("auto", -1, "-1"):
        return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1
    return int(devices)


def detect_placement(trainer) -> Placement:
    """This process's placement: started by ``nti`` (``NTI_RANK``), ``torchrun``, ``srun`` (more than one task),
    or alone — then, with ``trainer.devices`` > 1, the launcher of its node's ranks (rank 0)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    env = os.environ
    if env.get("NTI_RANK") is not None:
        return Placement(
            int(env["NTI_RANK"]),
            int(env["NTI_WORLD_SIZE"]),
            int(env["NTI_LOCAL_RANK"]),
            int(env["NTI_LOCAL_WORLD"]),
            env["NTI_SESSION"],
            int(env["NTI_LAUNCHER_PID"]),
            "nti (a rank it started)",
        )
    if TorchElasticEnvironment.detect():
        e = TorchElasticEnvironment()
        session = f"torchrun-{env.get('TORCHELASTIC_RUN_ID', '')}-{env.get('TORCHELASTIC_RESTART_COUNT', 0)}"
        local_world = int(env.get("LOCAL_WORLD_SIZE", e.world_size()))
        return Placement(e.global_rank(), e.world_size(), e.local_rank(), local_world, session, None, "torchrun")
    if SLURMEnvironment.detect() and int(env.get("SLURM_NTASKS", "1")) > 1:
        e = SLURMEnvironment()
        step = f"{env.get('SLURM_JOB_ID')}.{env.get('SLURM_STEP_ID', '')}.{env.get('SLURM_RESTART_COUNT', 0)}"
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
        return Placement(e.global_rank(), e.world_size(), e.local_rank(), local_world, f"slurm-{step}", None, "srun")
    devices = local_device_count(trainer)
    if trainer.num_nodes > 1:
        raise ValueError(
            f"trainer.num_nodes={trainer.num_nodes} needs a cluster launcher that starts one process per device "
            "(srun, torchrun); see docs/scaleout.md"
        )
    return Placement(0, devices, 0, devices, uuid.uuid4().hex, None, "nti" if devices > 1 else "a single process")


def check_placement(trainer, place: Placement) -> None:
    """Under srun/torchrun the launcher's world must be the configured devices × nodes."""
    if place.environment in ("srun", "torchrun"):
        want = local_device_count(trainer) * trainer.num_nodes
        if want != place.world:
            raise ValueError(
                f"{place.environment} started {place.world} processes but trainer.devices × trainer.num_nodes = "
                f"{want}; start one task per device (srun --ntasks-per-node=trainer.devices)"
            )


def make_fabric(cfg, place: Placement, tmp_dir: Path | None = None):
    """A single-device Fabric for this rank: its device, precision (``engine.runtime.precision_plugins``) and
    checkpoint I/O."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from nti_lightning.engine.runtime import precision_plugins
    from nti_lightning.run.checkpoint import WorkerCheckpointIO

    tr = cfg.trainer
    cuda = tr.accelerator in ("cuda", "gpu") or (tr.accelerator == "auto" and torch.cuda.is_available())
    kwargs = precision_plugins(tr.precision, "cuda" if cuda else "cpu")
    kwargs["plugins"] = [*kwargs.get("plugins", []), WorkerCheckpointIO(tmp_dir)]
    devices = [place.local_rank] if cuda else 1
    try:
        return L.Fabric(accelerator=tr.accelerator, devices=devices, num_nodes=1, strategy="auto", **kwargs)
    except (RuntimeError, MisconfigurationException) as e:  # no such accelerator here, too many devices, …
        first = str(e).strip().splitlines()[0]
        raise ValueError(
            f"trainer.accelerator={tr.accelerator} trainer.devices={tr.devices}: {first} "
            "(trainer.accelerator=auto picks what this machine has)"
        ) from None


def start_ranks(argv: list[str], place: Placement, cpu: bool) -> dict[int, subprocess.Popen]:
    """Ranks 1…G−1 of this node as ``nti`` processes running ``argv`` (this process is rank 0)."""
    procs = {}
    threads = max(1, (os.cpu_count() or 1) // place.local_world)
    for r in range(1, place.local_world):
        env = dict(
            os.environ,
            NTI_RANK=str(r),
            NTI_WORLD_SIZE=str(place.world),
            NTI_LOCAL_RANK=str(r),
            NTI_LOCAL_WORLD=str(place.local_world),
            NTI_SESSION=place.session,
            NTI_LAUNCHER_PID=str(os.getpid()),
        )
        if cpu:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        procs[r] = subprocess.Popen([sys.executable, "-m", "nti_lightning.cli", *argv], env=env)
    if cpu and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)  # each rank its share of the cores, as the started ones
    return procs


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
            f"see {summary.output}/logs/*.log. Finished images are recorded; rerun to complete the rest."
        )


def merge_rank_summaries(summary: RunSummary, paths: dict[int, Path], since: float) -> None:
    """Adds the final counts the ranks this process launched left (written after ``since``): the launching rank
    prints one summary of the whole run."""
    for r, path in paths.items():
        if r != summary.rank and path.is_file() and path.stat().st_mtime >= since:
            summary.merge(RunSummary.load(path, summary.output))


def stop_ranks(procs: dict[int, subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM (they save and exit), then SIGKILL what is still running after ``grace_s``."""
    for p in procs.values():
        if p.poll() is None:
            p.terminate() if grace_s > 0 else p.kill()
    end = time.monotonic() + grace_s
    for p in procs.values():
        try:
            p.wait(timeout=max(end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()


def launch(run_rank, cfg, argv: list[str] | None, summary_path, **flags) -> RunSummary:
    """Runs this process's rank of ``run_rank(cfg, place, stop, **flags)`` and, where it is the launcher of its
    node, the other ranks as subprocesses (module docstring). ``summary_path(worker_rank) -> Path`` is where a
    rank leaves its counts; ``argv`` is the command line the started ranks run."""
    from nti_lightning.run.signals import die_with_launcher

    place = detect_placement(cfg.trainer)
    check_placement(cfg.trainer, place)
    stop = StopFlag()  # before any rank starts: a signal then reaches them all
    if place.launcher_pid is not None:
        die_with_launcher(place.launcher_pid)
    procs: dict[int, subprocess.Popen] = {}
    since = time.time()
    try:
        if place.environment == "nti" and place.world > 1:
            if argv is None:
                raise ValueError("a run over several devices starts its ranks from the nti command line")
            cpu = not (cfg.trainer.accelerator in ("cuda", "gpu") or torch.cuda.is_available())
            procs = start_ranks(argv, place, cpu)
        stop.forward(lambda: [p.pid for p in procs.values() if p.poll() is None])
        try:
            summary = run_rank(cfg, place, stop, **flags)
        except BaseException:
            stop_ranks(procs, grace_s=30.0)  # the others save and stop: they must not run on alone
            raise
        if procs:
            settle_ranks(summary, {r: p.wait() for r, p in procs.items()})
            merge_rank_summaries(summary, {r: summary_path(r) for r in procs}, since)
        return summary
    finally:
        stop.restore()
