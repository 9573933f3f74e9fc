"""The frame of a job on the run layer, around its own work (``jobs.eval``, ``jobs.edit``).

``JobWorker`` holds one worker's folder (``run.folder.RunFolder``), logger and counts; ``run_job`` is the frame
every such job runs in, in the order of the run layer (``jobs.invert`` is the model):

1. ``setup()`` — check the inputs, claim the folder, compare its settings, build, then ``JobWorker.start``: rank 0
   commits the identity and the resolved config, the other ranks wait for it; everyone opens its record log. A
   failure before the start is published to the other ranks of the session, so they stop too.
2. ``work()`` — the job's loop; a stop signal (``Preempted``) ends it with what is recorded kept.
3. ``finish()`` — the job's summary files; the counts are saved for the process that launched this one.

The claims are released and the logger closed whatever happens (``close``).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from nti_lightning.run.folder import RunFolder, WorkerId
from nti_lightning.run.launch import Placement
from nti_lightning.run.progress import add_log_file, close_bar, close_logger, worker_logger
from nti_lightning.run.signals import Preempted, StopFlag
from nti_lightning.run.summary import RunSummary
from nti_lightning.store.records import RecordLog


def summary_path(out_dir: Path, worker: WorkerId) -> Path:
    """Where a worker leaves its final counts for the process that launched it."""
    return Path(out_dir) / "logs" / f"summary.{worker.name}.json"


class JobWorker:
    """One worker of a job: its place, folder, logger, counts and record log (``start``)."""

    def __init__(self, root: Path, worker: WorkerId, place: Placement, stop: StopFlag, quiet: bool, what: str):
        self.root, self.worker, self.place, self.stop, self.quiet = Path(root), worker, place, stop, quiet
        self.log = worker_logger(worker.name, None, quiet)
        self.folder = RunFolder(self.root, worker)
        self.summary = RunSummary(self.root, rank=place.rank, method=what)
        self.records: RecordLog | None = None
        self.bar = None
        self.closing: list[Callable[[], None]] = []

    def note(self, line: str) -> None:
        self.log.info(line)

    def warn(self, line: str) -> None:
        self.log.warning(f"warning: {line}")

    def claim(self, identity: dict, overwrite: bool, unknown: tuple[str, ...] = ()) -> None:
        """Every rank its claim; rank 0 compares the folder's settings (before anything is loaded)."""
        self.folder.claim(self.place.session, self.place.launcher_pid, self.note)
        if self.worker.rank == 0:
            self.folder.check_settings(identity, overwrite, unknown=unknown)

    def start(self, identity: dict, config_yaml: str, timeout_s: float) -> None:
        """Rank 0 commits the identity and the config and lets the other ranks start; they wait and check it.
        Then every rank's log file and record log."""
        session = self.place.session
        if self.worker.rank == 0:
            self.folder.commit(identity, config_yaml)
            if self.worker.world > 1:
                self.folder.publish_ready(session)
        else:
            self.folder.wait_ready(session, timeout_s)
            self.folder.check_settings(identity, overwrite=False)
        if self.worker.world > 1:
            self.folder.start_barrier(session, timeout_s)
        add_log_file(self.log, self.folder.log_path)
        self.records = self.folder.records(self.note)

    def close(self) -> None:
        """Every clean-up step runs, and none hides the error that stopped the run (each failure is one line)."""
        steps = [lambda: close_bar(self.log, self.bar), *self.closing, self.folder.release]
        steps.append(lambda: close_logger(self.log))
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 — a clean-up error must not replace the run's own
                self.log.warning(f"warning: while closing: {type(e).__name__}: {e}")


def run_job(w: JobWorker, setup: Callable[[], None], work: Callable[[], None], finish: Callable[[], None]):
    """Steps 1–3 (module docstring) → the worker's ``RunSummary`` (``preempted`` / ``interrupted`` after a stop)."""
    try:
        try:
            setup()
        except BaseException as e:
            if w.worker.rank == 0 and w.worker.world > 1 and w.folder.claims:
                w.folder.publish_ready(w.place.session, error=f"{type(e).__name__}: {e}")
            raise
        try:
            work()
        except Preempted as e:
            interrupted = w.stop.signum == signal.SIGINT
            w.summary.preempted, w.summary.interrupted = not interrupted, interrupted
            how = "interrupted" if interrupted else "preempted"
            w.note(f"{w.worker.name}: {how} ({e}); what finished is recorded; rerun the same command to resume")
        finish()
        w.summary.save(summary_path(w.root, w.worker))
        return w.summary
    finally:
        w.close()
