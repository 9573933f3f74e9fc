"""A worker's write-and-commit stage on one background thread: finished images are encoded, written and committed
while the engine goes on with the next ones.

A GPU spends ~2 s an image on NTI and the data plane ~10 ms of CPU (∅_t's codec, the shard write, its fsync):
run in line, that CPU time is GPU time lost. Here each task (a group's records, a failure's line) runs on one
thread in submission order, so the record log and the shards see exactly the sequence the synchronous loop
wrote. At most ``depth`` tasks wait (each holds a group's images: memory stays bounded). The first task that
fails stops the stage: the ones queued after it do not run (a shard must not be appended past a torn write),
and its error is raised in the submitting thread at the next ``submit`` or ``drain``. ``drain`` is the barrier
before a checkpoint: a checkpoint is saved only once everything finished before it is committed, so a kill
after it loses nothing (the checkpoint's stream position is past those images).

``concurrent.futures`` gives the thread and the futures; what it lacks is the stop-at-first-error rule and the
bound, which are these few lines.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class StageStopped(RuntimeError):
    """A task not run because an earlier one failed (that one's error is the one raised)."""


class CommitStage:
    """Runs tasks in order on one thread, at most ``depth`` waiting (module docstring)."""

    def __init__(self, depth: int = 2, name: str = "nti-commit") -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.pending: deque[Future] = deque()
        self.failed = False

    def _run(self, fn: Callable[..., Any], args: tuple) -> Any:
        if self.failed:
            raise StageStopped("an earlier write of this worker failed")
        try:
            return fn(*args)
        except BaseException:
            self.failed = True
            raise

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queues ``fn(*args)``; first waits while ``depth`` tasks wait, and raises the error of any that failed
        (``StageStopped`` once that error was raised)."""
        if self.failed and not self.pending:
            raise StageStopped("an earlier write of this worker failed")
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.depth):
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._run, fn, args))

    def drain(self) -> None:
        """Waits for every queued task; raises the first error (the tasks after it did not run)."""
        first: BaseException | None = None
        while self.pending:
            try:
                self.pending.popleft().result()
            except StageStopped:
                pass
            except BaseException as e:  # noqa: BLE001 — re-raised below, once the queue is empty
                first = first or e
        if first is not None:
            raise first

    def close(self) -> None:
        """``drain``, then the thread ends."""
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True)
