"""Stop signals: the handler only sets a flag; the worker checks it between UNet calls, saves and exits.

A rank started by another ``nti`` process also stops when that process dies (``die_with_launcher``): Linux's
parent-death signal, and a watch of the parent pid elsewhere, deliver SIGTERM, so an orphaned rank saves its
state and exits instead of running on beside a rerun.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable


class Preempted(Exception):
    """A stop signal arrived; the worker's state is saved."""


class StopFlag:
    """Installs SIGTERM/SIGUSR1/SIGUSR2/SIGINT handlers that record the signal; ``restore()`` puts the old ones
    back. SIGUSR1 is SLURM's ``--signal=USR1@300``, SIGUSR2 submitit's, SIGTERM scancel's and torchrun's,
    SIGINT Ctrl-C (a second Ctrl-C stops at once, without saving)."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT") if hasattr(signal, n))

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}
        self._forward_to: Callable[[], list[int]] | None = None
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, the run is then only kill-safe
                break

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:  # Ctrl-C twice: stop now, unsaved
            raise KeyboardInterrupt
        self.signum = signum
        try:  # never raise into the interrupted code
            forward = self._forward_to is not None and signum != signal.SIGINT  # Ctrl-C reaches the group
            for pid in self._forward_to() if forward else ():
                try:
                    os.kill(pid, signum)
                except OSError:  # exited meanwhile
                    pass
        except Exception:
            pass

    def forward(self, pids: Callable[[], list[int]]) -> None:
        """Passes every stop signal on to ``pids()``: the ranks this process launched (``ddp`` without
        srun/torchrun, ``ddp_spawn``), so that ``kill <launcher>`` stops and saves every rank, not only rank 0.
        A signal that came before the ranks existed is passed on now."""
        self._forward_to = pids
        if self.signum is not None:
            self._handle(self.signum, None)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def requeue_slurm_job(log) -> None:
    """``scontrol requeue`` this SLURM job (or array task), as Lightning's Trainer does on SIGUSR1."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return
    try:
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        log(f"scontrol requeue {job}: {'ok' if res.returncode == 0 else res.stderr.strip()}")
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"scontrol requeue {job} failed: {e}")


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


SUMMARY_ROWS = 1000


def die_with_launcher(launcher_pid: int) -> None:
    """SIGTERM to this process as soon as ``launcher_pid`` (its parent) is gone: ``prctl(PR_SET_PDEATHSIG)`` on
    Linux, and a 1-second watch of the parent pid (other systems, and the window before prctl)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while True:
            if os.getppid() != launcher_pid:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(1.0)

    threading.Thread(target=watch, name="nti-launcher-watch", daemon=True).start()
