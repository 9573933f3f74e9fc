"""A run's folder as one worker sees it: where its files go, its claim, the settings a rerun must match.

Every command's job (``nti invert``, ``nti eval``, ``nti edit --edits``) opens its folder through ``RunFolder``:

1. ``claim``: every rank publishes its claim (``run.claim``); rank 0 also holds the shard's claim and waits for
   (or refuses) live ranks of another run of that shard. Nothing else is written before the claims are held.
2. ``check_settings`` (rank 0, before the model loads): the folder's ``run.json`` against the run's settings,
   without what only the model can tell (its fingerprint); ``--overwrite`` is applied here.
3. ``commit`` (rank 0, once the model is loaded): the whole identity into ``run.json``, the resolved config into
   ``config.yaml``; then ``publish_ready`` lets the other ranks of this session start (``wait_ready``): the one
   start-up handshake, through a file, since ranks are independent processes.

A run that stops at a check before ``commit`` leaves nothing behind: the folders it made are removed again.
The worker's own files: ``manifest*.jsonl`` and ``.nti/index/<worker>.idx`` (``store.records``),
``checkpoints/shard{s}.rank{r}.pt``, ``logs/<worker>.log``, ``progress/<worker>.json`` and its temporary folder
``.nti/tmp/<worker>/`` (emptied when it starts: what a killed writer left there goes).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from nti_lightning.run.claim import Claim, OutputLockedError, is_orphan, live_claims
from nti_lightning.store.files import atomic_write, clear_folder, remove_stale_tmp
from nti_lightning.store.records import FAILURES_DIR, INDEX_DIR, RecordLog


class OutputMismatchError(RuntimeError):
    """The output folder holds results of a different model or hyperparameters."""


class StartupError(RuntimeError):
    """Rank 0 of this session stopped before the run started (its message says why)."""


@dataclass(frozen=True)
class WorkerId:
    """Which part of the work this process does: array task ``shard`` of ``num_shards``, rank of ``world``."""

    shard: int = 0
    num_shards: int = 1
    rank: int = 0
    world: int = 1

    @property
    def name(self) -> str:
        """``rank{r}``, or ``shard{s}.rank{r}`` in a job array: names its log, index, progress bar."""
        return f"shard{self.shard}.rank{self.rank}" if self.num_shards > 1 else f"rank{self.rank}"

    @property
    def manifest_name(self) -> str:
        if self.num_shards > 1:
            return f"manifest.shard{self.shard}.rank{self.rank}.jsonl"
        return "manifest.jsonl" if self.world == 1 else f"manifest.rank{self.rank}.jsonl"

    def is_mine(self, k: int) -> bool:
        """The static split: item (or input shard) k → array task k mod S, then rank (k div S) mod world."""
        return k % self.num_shards == self.shard and (k // self.num_shards) % self.world == self.rank


def identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (``inversion.guidance_scale``)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


class RunFolder:
    """One worker's view of its run folder (module docstring)."""

    def __init__(self, root: Path, worker: WorkerId, identity_file: str = "run.json") -> None:
        self.root, self.worker = Path(root), worker
        self.identity_path = self.root / identity_file
        self.existed = self.root.exists()
        self.tmp = self.root / ".nti" / "tmp" / worker.name
        self.checkpoint = self.root / "checkpoints" / f"shard{worker.shard}.rank{worker.rank}.pt"
        self.log_path = self.root / "logs" / f"{worker.name}.log"
        self.progress_path = self.root / "progress" / f"{worker.name}.json"
        self.claims: list[Claim] = []
        self.committed = False

    # -- 1. claims -----------------------------------------------------------------------------------------

    def claim(self, session: str, launcher_pid: int | None, log) -> None:
        """Every rank its own claim; rank 0 first the shard's, then checks no rank of another run is alive."""
        w, locks = self.worker, self.root / "locks"
        info = dict(session=session, rank=w.rank, shard=w.shard, launcher_pid=launcher_pid)
        if w.rank == 0:
            self._hold(Claim(locks / f"shard{w.shard}.lock", **info), log)
            deadline = time.monotonic() + 120
            while True:  # ranks of an earlier run of this shard (an orphan saving its state: wait for it)
                others = [(p, h) for p, h in live_claims(locks, f"shard{w.shard}.rank*.lock") if h.session != session]
                if not others:
                    break
                path, holder = others[0]
                if not is_orphan(holder) or time.monotonic() > deadline:
                    raise OutputLockedError(Claim(path).refusal(holder))
                time.sleep(0.5)
        self._hold(Claim(locks / f"shard{w.shard}.rank{w.rank}.lock", **info), log)
        self.tmp.mkdir(parents=True, exist_ok=True)
        clear_folder(self.tmp)
        if w.rank == 0:
            remove_stale_tmp(self.root)

    def _hold(self, claim: Claim, log) -> None:
        claim.acquire(log)
        self.claims.append(claim)

    def check_claims(self) -> None:
        """Raises ``ClaimLostError`` if another run took over one of this worker's claims."""
        for c in self.claims:
            c.check()

    # -- 2. settings ---------------------------------------------------------------------------------------

    def recorded_identity(self) -> dict | None:
        if not self.identity_path.is_file():
            return None
        try:
            return json.loads(self.identity_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise OutputMismatchError(
                f"{self.identity_path} cannot be read ({e}); restore it, or pass --overwrite to start the folder over"
            ) from e

    def check_settings(self, identity: dict, overwrite: bool, unknown: tuple[str, ...] = ()) -> None:
        """Refuses a folder whose recorded identity differs from ``identity`` on any key but ``unknown`` (what the
        model will tell), naming each differing key with both values; ``overwrite`` starts the folder over."""
        old = self.recorded_identity()
        if old is None:
            return
        diff = [k for k in identity_diff(old, identity) if k not in unknown and k.split(".")[0] not in unknown]
        if not diff:
            return
        if not overwrite:
            shown = "; ".join(f"{k}: {_get(old, k)!r} there, {_get(identity, k)!r} now" for k in diff)
            raise OutputMismatchError(
                f"{self.root} holds results made with other settings ({shown}). "
                "Use another --output, or pass --overwrite to start this folder over."
            )
        self.start_over()

    def start_over(self) -> None:
        """``--overwrite``: the records, index and checkpoints go; folders-layout outputs are overwritten as images
        finish, output shards (which only the index points into) and their sample PNGs go at once."""
        for p in self.root.glob("manifest*.jsonl"):
            p.unlink()
        for name in (INDEX_DIR, FAILURES_DIR, "checkpoints", "shards", "samples"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        (self.root / ".nti" / "layout.json").unlink(missing_ok=True)
        self.identity_path.unlink(missing_ok=True)

    # -- 3. commit and start -------------------------------------------------------------------------------

    def commit(self, identity: dict, config_yaml: str | None = None) -> None:
        """The whole identity into ``run.json`` (and the resolved config): from here on the folder is this run's."""
        self.check_settings(identity, overwrite=False)
        atomic_write(self.identity_path, json.dumps(identity, indent=2, sort_keys=True).encode(), self.tmp, True)
        if config_yaml is not None:
            w = self.worker
            name = f"config.shard{w.shard}.yaml" if w.num_shards > 1 else "config.yaml"
            atomic_write(self.root / name, config_yaml.encode(), self.tmp)
        self.committed = True

    def _ready_path(self) -> Path:
        return self.root / "locks" / f"shard{self.worker.shard}.ready.json"

    def publish_ready(self, session: str, error: str | None = None) -> None:
        """Rank 0: the other ranks of ``session`` may start (or must stop with ``error``)."""
        atomic_write(self._ready_path(), json.dumps({"session": session, "error": error}).encode(), self.tmp)

    def wait_ready(self, session: str, timeout_s: float, alive=lambda: True) -> None:
        """Ranks > 0: waits for rank 0 of this session to have checked and committed the folder."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                state = json.loads(self._ready_path().read_text())
            except (OSError, ValueError):
                state = None
            if state and state.get("session") == session:
                if state.get("error"):
                    raise StartupError(f"rank 0 stopped before the run started: {state['error']}")
                self.committed = True
                return
            if not alive():
                raise StartupError("rank 0 exited before the run started; see its log")
            time.sleep(0.2)
        raise StartupError(f"rank 0 did not start the run within {timeout_s:.0f} s (trainer.ddp_timeout_s)")

    def start_barrier(self, session: str, timeout_s: float) -> None:
        """Every rank of ``session`` waits here until all of its shard's ranks got this far (a file each), so that
        they start their loops together — the one start-up synchronisation; nothing later waits on another rank."""
        w, locks = self.worker, self.root / "locks"
        atomic_write(locks / f"shard{w.shard}.started.rank{w.rank}.json", json.dumps({"session": session}).encode(),
                     self.tmp)  # fmt: skip
        end = time.monotonic() + timeout_s
        for r in range(w.world):
            path = locks / f"shard{w.shard}.started.rank{r}.json"
            while True:
                try:
                    if json.loads(path.read_text()).get("session") == session:
                        break
                except (OSError, ValueError):
                    pass
                if time.monotonic() > end:
                    raise StartupError(f"rank {r} did not start within {timeout_s:.0f} s (trainer.ddp_timeout_s)")
                time.sleep(0.1)

    def records(self, log) -> RecordLog:
        name = self.worker.name
        return RecordLog(
            self.root / self.worker.manifest_name,
            self.root / INDEX_DIR / f"{name}.idx",
            self.root / FAILURES_DIR / f"{name}.jsonl",
            log,
        )

    def write_progress(self, fields: dict) -> None:
        atomic_write(self.progress_path, json.dumps(fields).encode(), self.tmp)

    # -- closing -------------------------------------------------------------------------------------------

    def release(self) -> None:
        """Releases the claims; if this worker never started (a check failed), the folders it made are removed
        again when nothing else is in them (another array task may share the folder: only empty ones go)."""
        for c in reversed(self.claims):
            c.release()
        self.claims.clear()
        if self.committed:
            return
        clear_folder(self.tmp)
        for d in (self.tmp, self.tmp.parent, self.tmp.parent.parent, self.root / "locks", self.root):
            try:
                os.rmdir(d)
            except OSError:
                pass
