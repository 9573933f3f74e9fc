"""``nti status OUTPUT``: done / failed / pending of a dataset run, across ranks and shards, with the failures.

Done and failed come from all ``manifest*.jsonl`` (the latest record of each id, through a disk-backed
``ManifestIndex``: only the counts and the failed ids with their errors are held); the total from
``progress.json`` (written at start-up). A folder with none of these (nor ``run.json``) is not a run: an error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nti_lightning.store.manifest import ManifestIndex


def status(out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir} is not an output folder")
    marks = (out_dir / "run.json", out_dir / "progress.json")
    if not any(out_dir.glob("manifest*.jsonl")) and not any(p.is_file() for p in marks):
        raise FileNotFoundError(
            f"{out_dir} is not the output folder of an `nti invert` run (no manifest*.jsonl, run.json or "
            "progress.json); give the run's --output folder"
        )
    index = ManifestIndex(out_dir)
    try:
        done = index.count("ok")
        failed = dict(index.failed())
    finally:
        index.close()
    total = None
    progress = out_dir / "progress.json"
    if progress.is_file():
        total = json.loads(progress.read_text()).get("total")
    pending = None if total is None else max(total - done - len(failed), 0)
    checkpoints = sorted(p.name for p in (out_dir / "checkpoints").glob("*.pt"))
    return {"done": done, "failed": failed, "pending": pending, "total": total, "checkpoints": checkpoints}


def print_status(out_dir: str | Path) -> int:
    try:
        s = status(out_dir)
    except FileNotFoundError as e:
        print(f"nti status: {e}", file=sys.stderr)
        return 2
    pending = "unknown" if s["pending"] is None else s["pending"]
    total = "" if s["total"] is None else f" of {s['total']}"
    print(f"{out_dir}: {s['done']} done, {len(s['failed'])} failed, {pending} pending{total}")
    if s["checkpoints"]:
        print(f"  {len(s['checkpoints'])} batch(es) stopped mid-way, resumed on rerun: {', '.join(s['checkpoints'])}")
    for k, err in s["failed"].items():
        print(f"  failed {k}: {err}")
    return 0
