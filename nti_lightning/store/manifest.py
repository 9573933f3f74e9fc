"""The manifest: one append-only JSON line per finished or failed image, per worker; read back merged."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from nti_lightning.data.items import temp_db


def manifest_name(rank: int, world_size: int, shard: int = 0, num_shards: int = 1) -> str:
    if num_shards > 1:
        return f"manifest.shard{shard}.rank{rank}.jsonl"
    return "manifest.jsonl" if world_size == 1 else f"manifest.rank{rank}.jsonl"


def append_manifest(path: Path, record: dict) -> None:
    """One JSON line, appended and fsynced: a crash leaves at most one partial last line (skipped on read)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def iter_manifest_records(out_dir: str | os.PathLike) -> Iterator[dict]:
    """Every record of a run's ``manifest*.jsonl`` files, in file-name then line order; lines cut by a crash
    (and anything that is not a record with an id) are skipped."""
    for p in sorted(Path(out_dir).glob("manifest*.jsonl")):
        with open(p, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if isinstance(rec, dict) and "id" in rec:
                    yield rec


def read_manifest(out_dir: str | os.PathLike) -> dict[str, dict]:
    """All manifest*.jsonl lines of a run, merged; the latest record of an id wins."""
    records: dict[str, dict] = {}
    for rec in iter_manifest_records(out_dir):
        prev = records.get(rec["id"])
        if prev is None or rec.get("finished_at", 0) >= prev.get("finished_at", 0):
            records[rec["id"]] = rec
    return records


class Previous(NamedTuple):
    """What a rerun needs of an id's latest manifest record."""

    status: str | None
    inversion: str | None  # paths.inversion of an "ok" record
    error: str | None  # of a record that is not "ok"
    finished_at: float = 0.0
    prompt: str | None = None  # the prompt it was inverted (or failed) with


class ManifestIndex:
    """The latest record of every id of a run's ``manifest*.jsonl`` reduced to ``Previous`` (status, inversion
    path, error), in a temporary SQLite database: a rerun over 10^7 images decides what to skip without holding
    the ~1 KB records in memory. Same merge as ``read_manifest``: files in name order, the latest
    ``finished_at`` wins (on a tie the later line), a line cut by a crash is skipped."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self._db = temp_db()
        self._db.execute(
            "CREATE TABLE m (id TEXT PRIMARY KEY, status TEXT, inversion TEXT, error TEXT, finished_at REAL, "
            "prompt TEXT) WITHOUT ROWID"
        )
        self._db.executemany(
            "INSERT INTO m VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
            "inversion = excluded.inversion, error = excluded.error, finished_at = excluded.finished_at, "
            "prompt = excluded.prompt "
            "WHERE excluded.finished_at >= m.finished_at",
            self._rows(Path(out_dir)),
        )

    @staticmethod
    def _rows(out_dir: Path) -> Iterator[tuple]:
        for rec in iter_manifest_records(out_dir):
            status = rec.get("status")
            paths = rec.get("paths")
            inversion = paths.get("inversion") if status == "ok" and isinstance(paths, dict) else None
            error = None if status == "ok" else rec.get("error", "")
            prompt = rec.get("prompt") if isinstance(rec.get("prompt"), str) else None
            yield rec["id"], status, inversion, error, rec.get("finished_at", 0), prompt

    def get(self, item_id: str) -> Previous | None:
        row = self._db.execute(
            "SELECT status, inversion, error, finished_at, prompt FROM m WHERE id = ?", (item_id,)
        ).fetchone()
        return None if row is None else Previous(*row)

    def count(self, status: str = "ok") -> int:
        return self._db.execute("SELECT COUNT(*) FROM m WHERE status = ?", (status,)).fetchone()[0]

    def failed(self) -> Iterator[tuple[str, str | None]]:
        """(id, error) of every id whose latest record is not "ok", sorted by id (streamed)."""
        return iter(self._db.execute("SELECT id, error FROM m WHERE status IS NOT 'ok' ORDER BY id"))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM m").fetchone()[0]

    def close(self) -> None:
        self._db.close()
