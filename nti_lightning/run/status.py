"""``nti status OUTPUT``: done / failed / pending against the dataset's total, per worker and per input shard,
with throughput and ETA.

It reads only the compact files: every worker's index (``.nti/index/*.idx``, 64 bytes an item: the latest entry
of each id wins across workers, and the worker whose file holds it is the one that made it), its progress file
(``progress/<worker>.json``: its share of the dataset and its input shards' names, source hashes and sizes,
written at start-up), its failures (``.nti/failures/*.jsonl``) and the checkpoint names — never the manifests'
full records, so its time grows with one sequential read of the index (``scripts/bench_data_plane.py``). A
folder from before the index is read from its manifests (in memory; nothing is written).

The dataset's total: a run of plain inputs knows it (every worker counts every name); with input shards each
worker knows only its share (it opens only its own shards), so the total is the sum of every worker's share
once all of them (``num_shards`` × ``world``) have started, and until then an estimate from those that have
(shown with "~").
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from nti_lightning.data.ids import printable
from nti_lightning.store.records import (
    FAILED,
    FAILURES_DIR,
    INDEX_DIR,
    OK,
    RunIndex,
    done_by_source,
    iter_jsonl,
    legacy_entries,
    read_index_file,
)

SHOW_SHARDS = 20
"""Input shards listed one by one (the partly done first); the rest are counted."""


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


def _load(out: Path) -> tuple[RunIndex, dict[str, dict]]:
    if not out.is_dir():
        raise NotARunError(f"{out} is not an output folder (no such folder)")
    has_index = any((out / INDEX_DIR).glob("*.idx"))
    markers = ((out / "run.json").is_file(), (out / "progress.json").is_file(), any(out.glob("manifest*.jsonl")))
    if not has_index and not any(markers):
        raise NotARunError(f"{out} is not the output folder of an `nti invert` run (no run.json, index or manifest)")
    by_worker = {p.stem: read_index_file(p) for p in sorted((out / INDEX_DIR).glob("*.idx"))} if has_index else {}
    if not by_worker and any(out.glob("manifest*.jsonl")):  # a folder from before the index: read in memory
        by_worker = {"legacy": legacy_entries(sorted(out.glob("manifest*.jsonl")))}
    progress = {}
    for p in sorted((out / "progress").glob("*.json")):
        try:
            progress[p.stem] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    return RunIndex.from_workers(by_worker), progress


def dataset_total(out: Path, progress: dict[str, dict]) -> tuple[int | None, bool]:
    """(total, exact) — see the module docstring; (None, False) when nothing tells."""
    total = next((v.get("total") for v in progress.values() if v.get("total") is not None), None)
    if total is not None:
        return total, True
    shares = {k: v["mine"] for k, v in progress.items() if isinstance(v.get("mine"), int)}
    if shares:
        any_ = next(iter(progress.values()))
        expected = int(any_.get("num_shards", 1)) * int(any_.get("world", 1))
        if len(shares) >= expected:
            return sum(shares.values()), True
        return round(sum(shares.values()) * expected / len(shares)), False
    if (out / "progress.json").is_file():  # a folder from before per-worker progress files
        return json.loads((out / "progress.json").read_text()).get("total"), True
    return None, False


def worker_rows(index: RunIndex, progress: dict[str, dict]) -> dict[str, dict]:
    """Per worker: done / failed (of the latest entries its index holds), pending of its share, rate, ETA."""
    latest = index.entries
    n = len(index.workers)
    done = np.bincount(index.origin[latest["status"] == OK], minlength=n)
    failed = np.bincount(index.origin[latest["status"] == FAILED], minlength=n)
    rows = {}
    for name in sorted(set(index.workers) | set(progress)):
        i = index.workers.index(name) if name in index.workers else None
        w_done, w_failed = (int(done[i]), int(failed[i])) if i is not None else (0, 0)
        entries = index.by_worker.get(name, latest[:0])
        share = progress.get(name, {}).get("mine")
        rate = _rate(entries)
        pending = None if share is None else max(share - w_done - w_failed, 0)
        rows[name] = {
            "done": w_done,
            "failed": w_failed,
            "pending": pending,
            "of": share,
            "per_hour": rate,
            "eta_h": None if pending is None or not rate else pending / rate,
            "last": float(entries["finished_at"].max()) if len(entries) else None,
        }
    return rows


def shard_rows(index: RunIndex, progress: dict[str, dict]) -> dict[str, dict]:
    """Per input shard named in the progress files: done / failed (latest entries with its source hash) of
    its size, and the worker whose share it is."""
    e = index.entries
    counts = done_by_source(e, e["status"] == OK, e["status"] == FAILED)
    rows = {}
    for worker, prog in progress.items():
        for name, source, size in prog.get("shards", []):
            ok, failed = counts.get(int(source, 16), (0, 0))
            rows[name] = {"done": ok, "failed": failed, "size": size, "worker": worker}
    return rows


def status(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    index, progress = _load(out)
    total, exact = dataset_total(out, progress)
    done, failed_n = index.count(OK), index.count(FAILED)
    workers = worker_rows(index, progress)
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
        "total_exact": exact,
        "workers": workers,
        "input_shards": shard_rows(index, progress),
        "per_hour": rate,
        "eta_h": None if pending is None or not rate else pending / rate,
        "checkpoints": sorted(p.name for p in (out / "checkpoints").glob("*.pt")),
        "at": time.time(),
    }


def _eta(hours: float | None) -> str:
    if hours is None:
        return ""
    return f", ETA {hours * 60:.0f} min" if hours < 1 else f", ETA {hours:.1f} h"


def _print_shards(shards: dict[str, dict]) -> None:
    if not shards:
        return
    finished = {k for k, v in shards.items() if v["size"] is not None and v["done"] + v["failed"] >= v["size"]}
    started = {k for k, v in shards.items() if v["done"] + v["failed"] > 0} - finished
    rest = len(shards) - len(finished) - len(started)
    print(f"  input shards: {len(finished)} done, {len(started)} partly done, {rest} not started, of {len(shards)}")
    shown = sorted(started) + sorted(set(shards) - finished - started) + sorted(finished)
    for name in shown[:SHOW_SHARDS]:
        v = shards[name]
        print(f"    {printable(name)}: {v['done']} done, {v['failed']} failed of {v['size']} ({v['worker']})")
    if len(shown) > SHOW_SHARDS:
        print(f"    … and {len(shown) - SHOW_SHARDS} more")


def print_status(out_dir: str | Path) -> int:
    try:
        s = status(out_dir)
    except NotARunError as e:
        print(f"nti status: {e}", file=sys.stderr)
        return 2
    pending = "unknown" if s["pending"] is None else ("" if s["total_exact"] else "~") + str(s["pending"])
    total = "" if s["total"] is None else f" of {'' if s['total_exact'] else '~'}{s['total']}"
    rate = f"; {s['per_hour']:.0f} images/h" if s["per_hour"] else ""
    print(f"{out_dir}: {s['done']} done, {s['n_failed']} failed, {pending} pending{total}{rate}{_eta(s['eta_h'])}")
    for name, w in s["workers"].items():
        of = "" if w["of"] is None else f", {w['pending']} pending of {w['of']}"
        rate = f"; {w['per_hour']:.0f} images/h" if w["per_hour"] else ""
        print(f"  {name}: {w['done']} done, {w['failed']} failed{of}{rate}{_eta(w['eta_h'])}")
    _print_shards(s["input_shards"])
    if s["checkpoints"]:
        print(f"  {len(s['checkpoints'])} batch(es) stopped mid-way, resumed on rerun: {', '.join(s['checkpoints'])}")
    for k, err in s["failed"].items():
        print(f"  failed {printable(k)}: {printable(err)}")
    return 0


__all__ = ["status", "print_status", "NotARunError"]
