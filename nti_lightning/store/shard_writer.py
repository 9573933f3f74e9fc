"""One worker's rolling output shards (the ``shards`` layout): ``OUTPUT/shards/<worker>-<n:06d>.tar``.

A shard is written as ``<name>.tar.part``, append-only: each group of finished images is one write of its
records (``tar_records``) and one fsync, then the fault point ``shard.appended``; the caller then commits the
group's records in the run's index, whose entries keep (shard number, byte offset) of each record. Before a
group would take the shard past ``max_images``, or past ``max_bytes`` once it holds ``min_images`` (so that the
files per record stay few whatever a record weighs), the shard is finished: two zero blocks end the
archive, its id → offset index is written beside it (``<name>.index.json``, atomically), and the ``.part`` is
renamed to ``.tar`` (``shard.finished``). A finished shard therefore holds only committed records.

A kill tears at most the ``.part``'s tail. When a worker opens its writer again, the ``.part`` is cut back to the
end of its last record that the index committed (the end is read from that record's member headers); nothing
committed is lost, nothing uncommitted survives, and appending goes on in the same shard. Images in flight at
the kill are in the engine's checkpoint, not here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from nti_lightning import faults
from nti_lightning.store.files import _fsync_dir, atomic_write
from nti_lightning.store.tar_records import (
    META_EXT,
    PART,
    SHARD_NAME,
    SHARDS_DIR,
    finish_bytes,
    index_file,
    member_key,
    read_member,
    record_parts,
    scan,
    shard_file,
)

INDEX_FORMAT = "nti-shard-index/1"


class ShardWriter:
    """Appends records to this worker's current shard and rolls to the next one (module docstring).

    ``committed``: (out_shard, out_offset) of every record of this worker the run's index holds (only those
    in a ``.part`` matter: they say where its committed part ends)."""

    def __init__(
        self,
        out_dir: Path,
        worker: str,
        committed: Iterable[tuple[int, int]] = (),
        max_bytes: int = 1 << 30,
        max_images: int = 10_000,
        min_images: int = 1,
        tmp_dir: Path | None = None,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.dir = Path(out_dir) / SHARDS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.worker, self.max_bytes, self.max_images, self.min_images = worker, max_bytes, max_images, min_images
        self.tmp_dir, self.log = tmp_dir, log
        self._file = None
        self._reset(0)
        self._recover(committed)

    # -- where ---------------------------------------------------------------------------------------------

    def _reset(self, n: int) -> None:
        self.n, self.size = n, 0
        self.ids: list[str] = []
        self.offsets: list[int] = []
        self.ends: list[int] = []

    @property
    def part(self) -> Path:
        return self.dir / (shard_file(self.worker, self.n) + PART)

    def _files(self) -> dict[int, bool]:
        """This worker's shard numbers → whether it is a ``.part``."""
        out: dict[int, bool] = {}
        with os.scandir(self.dir) as it:
            for e in it:
                m = SHARD_NAME.match(e.name)
                if m and m["worker"] == self.worker:
                    out[int(m["n"])] = out.get(int(m["n"]), False) or bool(m["part"])
        return out

    # -- opening again -------------------------------------------------------------------------------------

    def _recover(self, committed: Iterable[tuple[int, int]]) -> None:
        """Cuts each ``.part`` back to its last committed record; continues the last one (finished if full)."""
        files = self._files()
        by_shard: dict[int, set[int]] = {}
        for n, off in committed:
            by_shard.setdefault(int(n), set()).add(int(off))
        last = max(files, default=-1)
        for n in sorted(k for k, is_part in files.items() if is_part):
            self._reset(n)
            self._cut_back(by_shard.get(n, set()))
            if n != last or self._full(0, 0):
                self.finish()
        if self.n <= last and not self.part.is_file():
            self._reset(last + 1)

    def _cut_back(self, offsets: set[int]) -> None:
        path = self.part
        with open(path, "r+b") as f:
            size = f.seek(0, 2)
            keep = 0
            for span in scan(f, 0, size):
                if span.offset not in offsets:
                    break  # the first record the index does not hold: it and what follows were not committed
                meta = json.loads(read_member(f, span, META_EXT))
                self.ids.append(str(meta["id"]))
                self.offsets.append(span.offset)
                self.ends.append(span.end)
                keep = span.end
            if keep != size:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
                self.log(f"cut {size - keep} uncommitted byte(s) from {path} (a kill interrupted its writing)")
        self.size = keep

    # -- writing -------------------------------------------------------------------------------------------

    def _full(self, images: int, nbytes: int) -> bool:
        """Whether the current shard, holding records, must be finished before ``images`` more of ``nbytes``."""
        if not self.ids:
            return False
        if len(self.ids) + images > self.max_images:
            return True
        return len(self.ids) >= self.min_images and self.size + nbytes > self.max_bytes

    def append(self, records: list[tuple[str, list[tuple[str, bytes]]]]) -> list[tuple[int, int]]:
        """Appends (id, [(extension, data), …]) records as one durable write; returns (shard, offset) of each, for
        the run's index. The caller commits them before the next ``append`` (a finished shard holds only
        committed records)."""
        now = time.time()
        parts = [record_parts(member_key(item_id), members, now) for item_id, members in records]
        sizes = [sum(len(p) for p in ps) for ps in parts]
        if self._full(len(parts), sum(sizes)):
            self.finish()
        if self._file is None:
            created = not self.part.exists()
            self._file = open(self.part, "ab")
            if created:
                _fsync_dir(self.dir)
        where = []
        for (item_id, _), size in zip(records, sizes):
            where.append((self.n, self.size))
            self.ids.append(item_id)
            self.offsets.append(self.size)
            self.size += size
            self.ends.append(self.size)
        for ps in parts:
            self._file.writelines(ps)
        self._file.flush()
        os.fsync(self._file.fileno())
        faults.point("shard.appended")
        return where

    def finish(self) -> Path | None:
        """Ends the current shard: end-of-archive blocks, its index beside it, ``.part`` → ``.tar``; the next
        ``append`` starts shard n + 1. An empty shard is removed instead. Returns the finished shard."""
        self.close()
        part = self.part
        if not self.ids:
            part.unlink(missing_ok=True)
            return None
        with open(part, "ab") as f:
            f.write(finish_bytes())
            f.flush()
            os.fsync(f.fileno())
        done = part.with_name(shard_file(self.worker, self.n))
        index = {
            "format": INDEX_FORMAT,
            "shard": done.name,
            "records": len(self.ids),
            "bytes": self.size + len(finish_bytes()),
            "ids": self.ids,
            "offsets": self.offsets,
            "ends": self.ends,
        }
        atomic_write(self.dir / index_file(done.name), json.dumps(index).encode(), self.tmp_dir, True, "shard_index")
        os.replace(part, done)
        _fsync_dir(self.dir)
        faults.point("shard.finished")
        self._reset(self.n + 1)
        return done

    def close(self) -> None:
        """Closes the ``.part`` (left as it is: the next run of this worker continues it)."""
        if self._file is not None:
            self._file.close()
            self._file = None
