"""The record log of a run: one JSON line per finished or failed item, and a compact index that commits it.

Each worker appends to its own files (it holds the claim, so it is their only writer):

* ``manifest[.shardS][.rankR].jsonl`` — the full record of every item, for people and tools: strict JSON
  (a non-finite number is written as null with a ``<key>_nonfinite`` flag beside it), one fsynced line each.
* ``.nti/failures/<worker>.jsonl`` — the failed records alone (id, error, time), so ``nti status`` lists failures
  without reading every manifest line.
* ``.nti/index/<worker>.idx`` — 64 bytes per record (a 128-bit hash of the id, status, time, prompt hash,
  input shard, where the output went, seconds), appended after the manifest line. An item is done once its
  index entry is on disk; ``nti status`` and a resumed run read only these files — one sequential read of 64 MB
  per 10^6 images, whatever the manifest lines hold.

A kill can tear at most the last line or entry of each file. The writer cuts a torn tail before it appends (the
torn item was not committed and is redone); readers skip one. A manifest line whose index entry is missing
(a kill between the two) belongs to an item that is redone, and its later line wins.

Fixed-width binary entries rather than SQLite: appends are the only writes (safe on NFS/Lustre, where SQLite's
locking is not), a torn entry is found by the file's length, and numpy reads the whole index in one call
(``tests/store/test_records.py`` pins the torn-tail cases).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nti_lightning import faults
from nti_lightning.store.manifest import iter_jsonl

INDEX_DIR = ".nti/index"
FAILURES_DIR = ".nti/failures"
OK, FAILED = 1, 2
ENTRY = np.dtype(
    [
        ("key", "V16"),  # blake2b-128 of the id
        ("status", "u1"),  # OK or FAILED
        ("_pad", "V3"),
        ("out_shard", "<i4"),  # output shard number (-1: the folders layout)
        ("finished_at", "<f8"),
        ("prompt", "<u8"),  # blake2b-64 of the prompt (0: none)
        ("source", "<u8"),  # blake2b-64 of the input shard's name (0: not from a shard)
        ("out_offset", "<i8"),  # byte offset of the record in that shard (-1: none)
        ("seconds", "<f4"),
        ("_pad2", "V4"),
    ]
)
assert ENTRY.itemsize == 64


def id_key(item_id: str) -> bytes:
    return hashlib.blake2b(item_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def short_hash(text: str | None) -> int:
    if not text:
        return 0
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------------------------------------


def jsonable(value):
    """``value`` with every non-finite float replaced by None and a sibling ``<key>_nonfinite`` ("inf", "-inf"
    or "nan") in its dict: strict JSON readers reject ``Infinity`` and ``NaN``."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None
                out[f"{k}_nonfinite"] = "nan" if v != v else ("inf" if v > 0 else "-inf")
            else:
                out[k] = jsonable(v)
        return out
    if isinstance(value, (list, tuple)):
        return [None if isinstance(v, float) and not math.isfinite(v) else jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return jsonable(value.item())
    return value


def dumps(record: dict, **kwargs) -> str:
    return json.dumps(jsonable(record), allow_nan=False, ensure_ascii=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Appending
# ---------------------------------------------------------------------------------------------------------


def cut_torn_tail(path: Path, width: int | None = None) -> int:
    """Truncates a torn last line (``width`` None: a JSONL file) or a torn last entry (a file of ``width``-byte
    entries); returns the bytes cut."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return 0
    if width is not None:
        keep = size - size % width
    else:
        keep = size
        with open(path, "rb") as f:
            while keep > 0:
                start = max(0, keep - 65536)
                f.seek(start)
                chunk = f.read(keep - start)
                if keep == size and chunk.endswith(b"\n"):
                    break
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    keep = start + nl + 1
                    break
                keep = start
    if keep != size:
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return size - keep


def _append(path: Path, data: bytes, fault: str) -> None:
    with open(path, "ab") as f:
        if faults.armed(f"{fault}.partial"):  # a kill half-way through the write (the tests' torn tail)
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            faults.point(f"{fault}.partial")
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    faults.point(f"{fault}.appended")


@dataclass
class Row:
    """One record to commit (``RecordLog.append``'s arguments)."""

    record: dict
    status: int
    prompt: str | None = None
    source: str | int | None = None  # the input shard's name, or its short_hash
    out_shard: int = -1
    out_offset: int = -1
    seconds: float = 0.0


class RecordLog:
    """A worker's manifest and index, opened for appending (torn tails cut first, with a line in the log)."""

    def __init__(self, manifest: Path, index: Path, failures: Path, log=lambda line: None) -> None:
        self.manifest, self.index, self.failures = Path(manifest), Path(index), Path(failures)
        self.index.parent.mkdir(parents=True, exist_ok=True)
        self.failures.parent.mkdir(parents=True, exist_ok=True)
        for path, width in ((self.manifest, None), (self.failures, None), (self.index, ENTRY.itemsize)):
            cut = cut_torn_tail(path, width)
            if cut:
                log(f"cut a torn last record ({cut} bytes) from {path}: a kill interrupted its write; it is redone")

    def append(
        self,
        record: dict,
        status: int,
        prompt: str | None = None,
        source: str | int | None = None,
        out_shard: int = -1,
        out_offset: int = -1,
        seconds: float = 0.0,
    ) -> None:
        """The manifest line (and a failure's short line), then the index entry that commits it. ``source``: the
        input shard's name (hashed here) or its ``short_hash`` already taken."""
        self.append_many([Row(record, status, prompt, source, out_shard, out_offset, seconds)])

    def append_many(self, rows: list[Row]) -> None:
        """A group of records committed with one write and one fsync per file (manifest, failures, index) instead
        of one per record: every manifest line first, then every index entry. A kill between the two leaves lines
        without entries (those items are redone); a torn index write commits a prefix of the group."""
        if not rows:
            return
        lines = [(dumps(r.record) + "\n").encode("utf-8", "surrogatepass") for r in rows]
        _append(self.manifest, b"".join(lines), "record")
        failed = [r.record for r in rows if r.status == FAILED]
        if failed:
            shorts = [dumps({k: rec.get(k) for k in ("id", "source", "error", "finished_at")}) + "\n" for rec in failed]
            _append(self.failures, "".join(shorts).encode("utf-8", "surrogatepass"), "failure")
        entries = np.zeros(len(rows), ENTRY)
        entries["key"] = np.frombuffer(b"".join(id_key(r.record["id"]) for r in rows), "V16")
        entries["status"] = [r.status for r in rows]
        entries["finished_at"] = [r.record.get("finished_at", 0.0) for r in rows]
        entries["prompt"] = [short_hash(r.prompt) for r in rows]
        entries["source"] = [r.source if isinstance(r.source, int) else short_hash(r.source) for r in rows]
        entries["out_shard"] = [r.out_shard for r in rows]
        entries["out_offset"] = [r.out_offset for r in rows]
        entries["seconds"] = [r.seconds for r in rows]
        _append(self.index, entries.tobytes(), "index")


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def read_index_file(path: Path) -> np.ndarray:
    """A worker's entries (a torn last entry ignored)."""
    raw = np.fromfile(path, dtype=np.uint8)
    n = len(raw) // ENTRY.itemsize
    return raw[: n * ENTRY.itemsize].view(ENTRY)


class RunIndex:
    """The latest entry of every id across a run's index files, sorted by key: lookups by id without the
    manifests. ``by_worker`` keeps each file's entries for per-worker counts; ``origin[i]`` is the position in
    ``workers`` (the index files' stems) of the file that ``entries[i]`` came from — where its output is."""

    def __init__(
        self,
        entries: np.ndarray,
        by_worker: dict[str, np.ndarray] | None = None,
        origin: np.ndarray | None = None,
    ) -> None:
        self.by_worker = by_worker or {}
        self.workers = list(self.by_worker)
        origin = np.zeros(len(entries), np.int32) if origin is None else origin
        if len(entries):
            # latest per key: sort by (key, time), keep the last of each key (one copy: of the kept entries)
            order = np.lexsort((entries["finished_at"], entries["key"].view("S16")))
            keys = entries["key"].view("S16")[order]
            keep = order[np.r_[keys[1:] != keys[:-1], True]]
            del keys, order
            entries, origin = entries[keep], origin[keep]
        self.entries = entries
        self.origin = origin
        self._keys = entries["key"].view("S16")

    @classmethod
    def load(
        cls, out_dir: Path, pattern: str = "*.idx", sources: np.ndarray | None = None, whole: str | None = None
    ) -> RunIndex:
        """Every index file of a run. ``sources``: keep only the entries of these input shards (a worker that
        reads only its own shards holds only their entries: its memory follows its share, not the run's),
        except in the file of the worker ``whole``, kept whole (the worker's own records)."""
        by_worker = {}
        for p in sorted((Path(out_dir) / INDEX_DIR).glob(pattern)):
            entries = read_index_file(p)
            if sources is not None and p.stem != whole:
                entries = entries[np.isin(entries["source"], sources)]
            by_worker[p.stem] = entries
        return cls.from_workers(by_worker)

    @classmethod
    def from_workers(cls, by_worker: dict[str, np.ndarray]) -> RunIndex:
        """The index of these workers' entries (``origin`` from their order)."""
        parts = list(by_worker.values())
        if not parts:
            return cls(np.zeros(0, ENTRY), by_worker)
        origin = np.concatenate([np.full(len(e), i, np.int32) for i, e in enumerate(parts)])
        return cls(np.concatenate(parts), by_worker, origin)

    def __len__(self) -> int:
        return len(self.entries)

    def position(self, item_id: str) -> int | None:
        """Where ``item_id``'s latest entry is in ``entries`` (None: no record)."""
        key = np.frombuffer(id_key(item_id), "S16")[0]
        i = int(np.searchsorted(self._keys, key))
        return i if i < len(self._keys) and self._keys[i] == key else None

    def get(self, item_id: str) -> np.void | None:
        i = self.position(item_id)
        return None if i is None else self.entries[i]

    def worker_of(self, i: int) -> str | None:
        """The worker (index file stem) whose entry ``entries[i]`` is; None for an index made without files."""
        return self.workers[int(self.origin[i])] if self.workers else None

    def count(self, status: int) -> int:
        return int((self.entries["status"] == status).sum())


def done_by_source(entries: np.ndarray, ok: np.ndarray, failed: np.ndarray) -> dict[int, tuple[int, int]]:
    """{source: (#ok, #failed)} of index entries, ``ok``/``failed`` masks over them (source 0 left out)."""
    out: dict[int, list[int]] = {}
    for col, mask in ((0, ok), (1, failed)):
        sources, counts = np.unique(entries["source"][mask], return_counts=True)
        for src, n in zip(sources.tolist(), counts.tolist()):
            if src:
                out.setdefault(src, [0, 0])[col] = n
    return {k: (v[0], v[1]) for k, v in out.items()}


def legacy_entries(manifests: Iterable[Path]) -> np.ndarray:
    """Index entries made from manifests written before the index existed (one pass)."""
    entries = []
    for p in manifests:
        for rec in iter_jsonl(p):
            e = np.zeros(1, ENTRY)
            e["key"] = np.frombuffer(id_key(str(rec["id"])), "V16")
            e["status"] = OK if rec.get("status") == "ok" else FAILED
            e["finished_at"] = float(rec.get("finished_at") or 0.0)
            e["prompt"] = short_hash(rec.get("prompt") if isinstance(rec.get("prompt"), str) else None)
            e["out_shard"], e["out_offset"] = -1, -1
            entries.append(e)
    return np.concatenate(entries) if entries else np.zeros(0, ENTRY)


def write_legacy_index(out_dir: Path, manifests: Iterable[Path], name: str = "legacy") -> Path | None:
    """``legacy_entries`` written as an index file, once, by the first run into an older folder: ``nti status``
    and resume then read entries as for any run. Returns its path, or None if there was nothing to index."""
    entries = legacy_entries(manifests)
    if not len(entries):
        return None
    path = Path(out_dir) / INDEX_DIR / f"{name}.idx"
    path.parent.mkdir(parents=True, exist_ok=True)
    from nti_lightning.store.files import atomic_write

    atomic_write(path, entries.tobytes(), durable=True, fault="index")
    return path
