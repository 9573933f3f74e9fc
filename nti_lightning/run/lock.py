"""One run per output folder and shard: a lock file that names its holder.

Two ``nti invert`` runs on one folder would append the same images to one manifest and overwrite each
other's checkpoints. Rank 0 of each shard takes ``locks/shard{s}.lock`` (host, pid, start time, SLURM job)
before it writes anything, refreshes it while it runs (the heartbeat) and removes it at the end. A lock whose
holder is gone — a dead pid on this host, or no heartbeat for ``STALE_S`` from another host — is taken over
with a line in the log.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nti_lightning.store.files import HOST, pid_alive

STALE_S = 600.0
"""A lock from another host whose heartbeat is older than this is stale (its holder was killed)."""
HEARTBEAT_S = 30.0


class OutputLockedError(RuntimeError):
    """Another run holds the output folder (shard)."""


class OutputLock:
    def __init__(self, out_dir: Path, shard: int = 0) -> None:
        self.path = out_dir / "locks" / f"shard{shard}.lock"
        self._beat = 0.0

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_stale(self, holder: dict) -> bool:
        if holder.get("host") == HOST:
            return not pid_alive(int(holder.get("pid", -1)))
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > STALE_S

    def acquire(self, log) -> None:
        """Takes the lock or raises ``OutputLockedError`` naming the holder and the fix."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "host": HOST,
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder() or {}
                if not self.is_stale(holder):
                    raise OutputLockedError(
                        f"{self.path.parent.parent} is in use by another run (host {holder.get('host')}, pid "
                        f"{holder.get('pid')}, started {holder.get('started')}): wait for it, use another --output, "
                        f"or delete {self.path} if that run is certainly gone"
                    ) from None
                log(f"taking over the stale lock {self.path} of host {holder.get('host')} pid {holder.get('pid')}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._beat = time.monotonic()
            return
        raise OutputLockedError(f"could not take {self.path}: another run took it at the same moment")

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._beat >= HEARTBEAT_S:
            self._beat = now
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        holder = self.holder()
        if holder is not None and holder.get("host") == HOST and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
