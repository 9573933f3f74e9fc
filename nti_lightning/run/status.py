"""``nti status OUTPUT``: done / failed / pending against the dataset's total, per worker, with throughput and ETA.

It reads only the compact files: every worker's index (``.nti/index/*.idx``, 64 bytes an item: the latest entry
of each id wins across workers), its progress file (``progress/<worker>.json``: its share of the dataset, written
at start-up), its failures (``.nti/failures/*.jsonl``) and the checkpoint names — never the manifests' full
records, so its time grows with one sequential read of the index. A folder from before the index is read from
its manifests (in memory; nothing is written).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from nti_lightning.data.ids import printable
from nti_lightning.run.records import (
    ENTRY,
    FAILED,
    FAILURES_DIR,
    INDEX_DIR,
    OK,
    RunIndex,
    iter_jsonl,
    legacy_entries,
    read_index_file,
)


class NotARunError(FileNotFoundError):
    """The folder holds no run (no run.json, index or manifest)."""


def _rate(entries: np.ndarray, window_s: float = 3600.0) -> float | None:
    """Items per hour over the last ``window_s`` of a worker's entries (None: too few to tell)."""
    if len(entries) < 2:
        return None
    t = np.sort(entries["finished_at"])
    recent = t[t >= t[-1] - window_s]
    span = recent[-1] - recent[0]
    return None if len(recent) < 2 or span <= 0 else 3600.0 * (len(recent) - 1) / span


def status(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    if not out.is_dir():
        raise NotARunError(f"{out} is not an output folder (no such folder)")
    has_index = any((out / INDEX_DIR).glob("*.idx"))
    markers = ((out / "run.json").is_file(), (out / "progress.json").is_file(), any(out.glob("manifest*.jsonl")))
    if not has_index and not any(markers):
        raise NotARunError(f"{out} is not the output folder of an `nti invert` run (no run.json, index or manifest)")
    by_worker = {p.stem: read_index_file(p) for p in sorted((out / INDEX_DIR).glob("*.idx"))} if has_index else {}
    if not by_worker and any(out.glob("manifest*.jsonl")):  # a folder from before the index: read in memory
        by_worker = {"legacy": legacy_entries(sorted(out.glob("manifest*.jsonl")))}
    parts = list(by_worker.values())
    index = RunIndex(np.concatenate(parts) if parts else np.zeros(0, ENTRY))
    progress = {}
    for p in sorted((out / "progress").glob("*.json")):
        try:
            progress[p.stem] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    total = next((v.get("total") for v in progress.values() if v.get("total") is not None), None)
    if total is None and (out / "progress.json").is_file():  # a folder from before per-worker progress files
        total = json.loads((out / "progress.json").read_text()).get("total")
    done, failed_n = index.count(OK), index.count(FAILED)
    workers = {}
    for name, entries in by_worker.items():
        latest = index.entries
        mine = np.isin(latest["key"].view("S16"), entries["key"].view("S16"))
        w_done = int((latest["status"][mine] == OK).sum())
        w_failed = int((latest["status"][mine] == FAILED).sum())
        share = progress.get(name, {}).get("mine")
        rate = _rate(entries)
        pending = None if share is None else max(share - w_done - w_failed, 0)
        eta_h = None if pending is None or not rate else pending / rate
        workers[name] = {
            "done": w_done,
            "failed": w_failed,
            "pending": pending,
            "of": share,
            "per_hour": rate,
            "eta_h": eta_h,
            "last": float(entries["finished_at"].max()) if len(entries) else None,
        }
    failures = {}
    sources = sorted((out / FAILURES_DIR).glob("*.jsonl")) or sorted(out.glob("manifest*.jsonl"))  # older folders
    for p in sources:
        for rec in iter_jsonl(p):
            e = index.get(str(rec["id"]))
            if e is not None and e["status"] == FAILED and rec.get("status", "failed") != "ok":
                failures[str(rec["id"])] = rec.get("error")
    pending = None if total is None else max(total - done - failed_n, 0)
    rates = [w["per_hour"] for w in workers.values() if w["per_hour"]]
    rate = sum(rates) if rates else None
    return {
        "done": done,
        "failed": failures,
        "n_failed": failed_n,
        "pending": pending,
        "total": total,
        "workers": workers,
        "per_hour": rate,
        "eta_h": None if pending is None or not rate else pending / rate,
        "checkpoints": sorted(p.name for p in (out / "checkpoints").glob("*.pt")),
        "at": time.time(),
    }


def _eta(hours: float | None) -> str:
    if hours is None:
        return ""
    return f", ETA {hours * 60:.0f} min" if hours < 1 else f", ETA {hours:.1f} h"


def print_status(out_dir: str | Path) -> int:
    try:
        s = status(out_dir)
    except NotARunError as e:
        print(f"nti status: {e}", file=sys.stderr)
        return 2
    pending = "unknown" if s["pending"] is None else s["pending"]
    total = "" if s["total"] is None else f" of {s['total']}"
    rate = f"; {s['per_hour']:.0f} images/h" if s["per_hour"] else ""
    print(f"{out_dir}: {s['done']} done, {s['n_failed']} failed, {pending} pending{total}{rate}{_eta(s['eta_h'])}")
    for name, w in s["workers"].items():
        of = "" if w["of"] is None else f", {w['pending']} pending of {w['of']}"
        rate = f"; {w['per_hour']:.0f} images/h" if w["per_hour"] else ""
        print(f"  {name}: {w['done']} done, {w['failed']} failed{of}{rate}{_eta(w['eta_h'])}")
    if s["checkpoints"]:
        print(f"  {len(s['checkpoints'])} batch(es) stopped mid-way, resumed on rerun: {', '.join(s['checkpoints'])}")
    for k, err in s["failed"].items():
        print(f"  failed {printable(k)}: {printable(err)}")
    return 0


__all__ = ["status", "print_status", "NotARunError"]
