"""One run per output folder and shard, held by every rank: claim files published whole and taken over atomically.

A claim is a small JSON file (host, pid and the process's start time, session, rank, shard, launcher pid,
SLURM job) in ``OUTPUT/locks/``. It is **published whole**: written and fsynced under a temporary name, then
hard-linked to its name — the link fails if the name exists, so creating it is the test, and there is never an
empty or half-written claim. A background thread refreshes its modification time (the heartbeat) and notices
if the claim was taken from it. A holder is gone when, on this host, its pid is dead or belongs to another
process (start time differs), or, from another host, no heartbeat came for ``STALE_S``; an unreadable claim is
gone. A gone holder's claim is **taken over atomically**: the taker hard-links the stale claim to a name
derived from its inode, which only one taker can create, checks the inode is still the one it judged, and
only then removes it and publishes its own. Two runs that both judge a claim stale cannot both take it.

Why not ``filelock``: its soft locks create the marker with O_EXCL and write the owner after, so a kill between
the two leaves an empty marker that blocks every later run as an "owner that recorded no PID", and its strict
lock is never broken by age (``tests/run/test_claim.py`` pins both); its ``FileLock`` (flock) records no
holder to name and is not coherent across NFS clients.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from nti_lightning import faults
from nti_lightning.store.files import HOST, pid_alive

STALE_S = 600.0
"""A claim from another host whose heartbeat is older than this is gone (its holder was killed)."""
HEARTBEAT_S = 30.0
"""How often a held claim's modification time is refreshed."""
ORPHAN_WAIT_S = 120.0
"""How long a new run waits for a rank of an earlier run whose launcher died (it saves and exits)."""


class OutputLockedError(RuntimeError):
    """Another run holds the output folder (shard, rank)."""


class ClaimLostError(RuntimeError):
    """This run's claim was taken over by another run (e.g. after a stall longer than ``STALE_S``)."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux: boot id + clock ticks since boot), None where unknown: with the
    pid it identifies a process even after its pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return f"{_boot_id()}:{fields[19]}" if len(fields) > 19 else None


@dataclass
class Holder:
    """What a claim says about the process holding it."""

    host: str | None = None
    pid: int | None = None
    start: str | None = None  # process_start(pid)
    started: str | None = None  # human-readable time
    session: str | None = None
    rank: int | None = None
    shard: int | None = None
    launcher_pid: int | None = None  # the process that started this rank, on the same host
    slurm_job: str | None = None
    nonce: str | None = None  # this hold's own token: an inode can be reused, a nonce is not

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        rank = f" rank {self.rank}" if self.rank is not None else ""
        return f"{rank.strip() or 'a run'} on host {self.host}, pid {self.pid}, started {self.started}{job}".strip()


def _read(path: Path) -> tuple[Holder | None, os.stat_result] | None:
    """(holder or None if unreadable, the file's stat) — None if there is no file."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read(65536)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError
        pid = data.get("pid")
        holder = Holder(**{k: data.get(k) for k in Holder.__dataclass_fields__})
        holder.pid = int(pid) if isinstance(pid, (int, str)) and str(pid).isdigit() else None
        return holder, st
    except (ValueError, TypeError):
        return None, st


def is_live(holder: Holder | None, st: os.stat_result, stale_s: float = STALE_S) -> bool:
    """Whether the claim's holder may still be running (module docstring)."""
    if holder is None or not holder.host:
        return False  # unreadable: claims are published whole, so no live holder writes one like this
    if holder.host == HOST:
        if holder.pid is None or not pid_alive(holder.pid):
            return False
        return holder.start is None or process_start(holder.pid) in (None, holder.start)
    return time.time() - st.st_mtime < stale_s


def is_orphan(holder: Holder) -> bool:
    """A rank on this host whose launching process is gone: it stops by itself (parent-death signal)."""
    return holder.host == HOST and holder.launcher_pid is not None and not pid_alive(int(holder.launcher_pid))


class Claim:
    """A claim file held by this process (module docstring): ``acquire``, then ``release``; ``lost`` turns true
    if another run took it over."""

    def __init__(self, path: Path, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S, **info) -> None:
        self.path, self.stale_s, self.heartbeat_s = Path(path), stale_s, heartbeat_s
        self.me = Holder(
            host=HOST,
            pid=os.getpid(),
            start=process_start(os.getpid()),
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
            slurm_job=os.environ.get("SLURM_JOB_ID"),
            nonce=uuid.uuid4().hex,
            **info,
        )
        self._inode: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # -- acquiring -----------------------------------------------------------------------------------------

    def acquire(self, log=lambda line: None, orphan_wait_s: float = ORPHAN_WAIT_S) -> None:
        """Publishes this claim, taking over a gone holder's; waits up to ``orphan_wait_s`` for an orphaned rank
        of an earlier run; else raises ``OutputLockedError`` naming the holder and the fix."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{HOST}-{os.getpid()}.claim")
        tmp.write_bytes(json.dumps(asdict(self.me)).encode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        deadline = time.monotonic() + orphan_wait_s
        try:
            while not self._publish(tmp):
                found = _read(self.path)
                if found is None:
                    continue  # released meanwhile
                holder, st = found
                if is_live(holder, st, self.stale_s):
                    if is_orphan(holder) and time.monotonic() < deadline:
                        time.sleep(0.2)
                        continue
                    raise OutputLockedError(self.refusal(holder))
                faults.point("claim.takeover")
                if take_over(self.path, st):
                    what = holder.describe() if holder is not None else "an unreadable claim"
                    log(f"took over the claim {self.path} of {what}: that holder is gone")
                else:
                    time.sleep(0.05)  # another run is taking it over: look again
        finally:
            tmp.unlink(missing_ok=True)
        self._inode = os.stat(self.path).st_ino
        faults.point("claim.published")
        self._thread = threading.Thread(target=self._beat, name="nti-claim-heartbeat", daemon=True)
        self._thread.start()

    def _publish(self, tmp: Path) -> bool:
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:  # a file system without hard links: exclusive create, then write (not whole)
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(tmp.read_bytes())
                f.flush()
                os.fsync(f.fileno())
            return True

    def refusal(self, holder: Holder) -> str:
        folder = self.path.parent.parent
        return (
            f"{folder} is in use by another run ({holder.describe()}): wait for it, use another --output, or "
            f"delete {self.path} if that run is certainly gone"
        )

    # -- holding -------------------------------------------------------------------------------------------

    def is_ours(self) -> bool:
        """The claim file is still this hold's (same inode and nonce)."""
        found = _read(self.path)
        return (
            found is not None
            and found[1].st_ino == self._inode
            and found[0] is not None
            and (found[0].nonce == self.me.nonce)
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.is_ours():
                    self.lost = True
                    return
                os.utime(self.path)
            except OSError:
                pass  # a passing file-system error: the next beat retries

    def check(self) -> None:
        """Raises ``ClaimLostError`` if another run took this claim over (checked between UNet calls)."""
        if self.lost:
            raise ClaimLostError(
                f"the claim {self.path} was taken over by another run (this process stalled for over "
                f"{self.stale_s:.0f} s?); stopping without writing more"
            )

    def release(self) -> None:
        self._stop.set()
        if self._inode is None:
            return
        try:
            if self.is_ours():
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._inode = None


def take_over(path: Path, judged: os.stat_result, token_stale_s: float = 30.0) -> bool:
    """Removes the stale claim ``path`` if it is still the file judged stale (``judged``'s inode); True if this
    process removed it. At most one taker succeeds: each links the claim to a name made of its inode first."""
    token = path.with_name(f"{path.name}.takeover-{judged.st_ino}-{judged.st_mtime_ns}")
    try:
        os.link(path, token)
    except FileNotFoundError:
        return False  # removed meanwhile: publish again
    except FileExistsError:
        try:  # a taker that died after linking leaves its token: clear it after a while
            if time.time() - os.stat(token).st_mtime > token_stale_s:
                token.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        path.unlink(missing_ok=True)  # no hard links here: best effort
        return True
    try:
        if os.stat(token).st_ino != judged.st_ino:
            return False  # the claim was replaced between the judging and the link: not stale any more
        path.unlink(missing_ok=True)
        return True
    finally:
        token.unlink(missing_ok=True)


def live_claims(folder: Path, pattern: str, stale_s: float = STALE_S) -> list[tuple[Path, Holder]]:
    """The live claims matching ``pattern`` in ``folder`` (stale ones are removed on the way, atomically)."""
    out = []
    for p in sorted(Path(folder).glob(pattern)):
        found = _read(p)
        if found is None:
            continue
        holder, st = found
        if is_live(holder, st, stale_s):
            out.append((p, holder))
        else:
            take_over(p, st)
    return out
