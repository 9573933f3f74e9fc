"""A worker's checkpoint: the slot engine's whole state plus where the item stream stood.

One file per worker (``checkpoints/shard{s}.rank{r}.pt``), written atomically by that worker — never
``fabric.save``, which writes on rank 0 only and synchronises all ranks (each rank here holds other images).
Resuming from it continues the run bit for bit (see ``worker``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from nti_lightning.store.files import tmp_path

CHECKPOINT_FORMAT = 2


def checkpoint_path(out_dir: Path, rank: int, shard: int = 0) -> Path:
    return out_dir / "checkpoints" / f"shard{shard}.rank{rank}.pt"


def save_checkpoint(path: Path, identity: dict, engine_state: dict, items: dict[str, dict]) -> None:
    """Atomically writes ``engine_state`` (``SlotEngine.state_dict()``) and the in-flight items (id → item
    fields + pixel hash); ``saved_at`` tells a resumed run which manifest rows came after it."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "identity": json.dumps(identity, sort_keys=True),
        "saved_at": time.time(),
        "items": json.dumps(items),
        "engine": engine_state,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at ``path``; None if there is none, ``{"format": None}`` if it is not one of ours."""
    for p in path.parent.glob(f".{path.name}.*.tmp"):  # this worker's own, cut by a kill
        p.unlink(missing_ok=True)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # a truncated file cannot happen (atomic writes), but a foreign one can
        return {"format": None}
    if isinstance(ck, dict) and ck.get("format") == CHECKPOINT_FORMAT:
        ck["items"] = json.loads(ck["items"])
    return ck


def checkpoint_mismatch(ck: dict, identity: dict) -> list[str]:
    """Names what differs between a checkpoint and the run about to start ([] = resumable)."""
    if ck.get("format") != CHECKPOINT_FORMAT:
        return ["format"]
    old = json.loads(ck["identity"])
    return sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
