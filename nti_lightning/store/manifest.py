"""Reading a run's manifests (``manifest*.jsonl``, one JSON line per item and attempt, per worker), merged.

The run layer writes them (``store.records``) and commits each line with an index entry; these readers are for
tools and people who want whole records: every line of every worker, or the latest record of each id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path


def iter_jsonl(path: Path) -> Iterator[dict]:
    """The records of one JSONL file; a torn or foreign line is skipped."""
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict) and "id" in rec:
                yield rec


def iter_manifest_records(out_dir: str | os.PathLike) -> Iterator[dict]:
    """Every record of a run's ``manifest*.jsonl`` files, in file-name then line order; lines cut by a crash
    (and anything that is not a record with an id) are skipped."""
    for p in sorted(Path(out_dir).glob("manifest*.jsonl")):
        yield from iter_jsonl(p)


def read_manifest(out_dir: str | os.PathLike) -> dict[str, dict]:
    """All manifest lines of a run, merged; the latest record of an id wins (on a tie the later line)."""
    records: dict[str, dict] = {}
    for rec in iter_manifest_records(out_dir):
        prev = records.get(rec["id"])
        if prev is None or (rec.get("finished_at") or 0) >= (prev.get("finished_at") or 0):
            records[rec["id"]] = rec
    return records
