"""Why ``nti`` starts its own ranks (``run/launch.py``): Lightning's ``ddp`` launcher watches the ranks it starts
with a child-process observer that SIGKILLs every process — the launcher included — as soon as one rank exits
non-zero, also with 75 after a preemption while the others are still saving their state."""

from __future__ import annotations

import signal
import subprocess
import sys

from nti_lightning.exit_codes import EXIT_PREEMPTED


def test_lightnings_observer_kills_the_launcher_when_a_rank_exits_75():
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands for rank 0
    rank1 = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({EXIT_PREEMPTED})"])
    rank1.wait()
    try:
        _ChildProcessObserver(launcher.pid, [rank1])._run()
        assert launcher.wait(timeout=30) == -signal.SIGKILL  # rank 0 killed while it would be saving
    finally:
        if launcher.poll() is None:
            launcher.kill()
