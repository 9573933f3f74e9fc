"""A worker's checkpoint: the slot engine's whole state and the items in flight, checksummed, one file per worker.

Written through Lightning's ``CheckpointIO`` interface (``WorkerCheckpointIO``, given to Fabric as a plugin and
used as ``fabric.strategy.checkpoint_io``) by each worker for itself: ``fabric.save`` writes on rank 0 only and
synchronises the ranks, and every rank here holds other images. The file is ``MAGIC``, the payload's length and
its SHA-256, then the payload (``torch.save``); it is written with ``store.files.atomic_write`` (fsynced, renamed,
the folder fsynced). Loading tells apart an empty, truncated, foreign or corrupt file — each is one line in the
log, and its images start over — from a checkpoint made with other settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import time
from pathlib import Path

import torch
from lightning.fabric.plugins import CheckpointIO

from nti_lightning.store.files import atomic_write

CHECKPOINT_FORMAT = 3
MAGIC = b"NTICKPT\x03"
_HEADER = struct.Struct("<8sQ32s")  # magic, payload length, sha256


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message says what it is."""


def checkpoint_path(out_dir: Path, rank: int, shard: int = 0) -> Path:
    return out_dir / "checkpoints" / f"shard{shard}.rank{rank}.pt"


class WorkerCheckpointIO(CheckpointIO):
    """Lightning's ``CheckpointIO`` for one worker's own checkpoint: atomic, checksummed, read back with
    ``weights_only`` (no code in a checkpoint is ever run)."""

    def __init__(self, tmp_dir: Path | None = None) -> None:
        self.tmp_dir = tmp_dir

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        payload = buf.getvalue()
        header = _HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest())

        def write(f) -> None:
            f.write(header)
            f.write(payload)

        atomic_write(Path(path), write, self.tmp_dir, durable=True, fault="checkpoint")

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        path = Path(path)
        data = path.read_bytes()
        if not data:
            raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
        if len(data) < _HEADER.size or not data.startswith(MAGIC[:7]):
            raise CheckpointError(
                f"checkpoint {path} is not an nti_lightning checkpoint of this version (foreign file)"
            )
        magic, length, digest = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise CheckpointError(f"checkpoint {path} has format {magic[-1]}, this version reads {MAGIC[-1]}")
        payload = data[_HEADER.size :]
        if len(payload) != length:
            raise CheckpointError(f"checkpoint {path} is truncated ({len(payload)} of {length} payload bytes)")
        if hashlib.sha256(payload).digest() != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt (its checksum does not match: a disk or copy error)")
        try:
            return torch.load(io.BytesIO(payload), map_location=map_location or "cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 — a checksummed payload that does not unpickle: say so
            raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


def save_checkpoint(io_: CheckpointIO, path: Path, identity: dict, engine_state: dict, items: dict) -> None:
    """``engine_state`` (``SlotEngine.state_dict()``) and the in-flight items (id → item fields + pixel hash);
    ``saved_at`` tells a resumed run which records came after it."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "identity": json.dumps(identity, sort_keys=True),
        "saved_at": time.time(),
        "items": json.dumps(items),
        "engine": engine_state,
    }
    io_.save_checkpoint(payload, path)


def load_checkpoint(io_: CheckpointIO, path: Path) -> dict | None:
    """The checkpoint at ``path``, None if there is none; ``CheckpointError`` saying what a bad one is."""
    if not path.is_file():
        return None
    ck = io_.load_checkpoint(path)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} holds no nti_lightning engine state")
    ck["items"] = json.loads(ck["items"])
    return ck


def checkpoint_mismatch(ck: dict, identity: dict) -> list[str]:
    """Names what differs between a checkpoint and the run about to start ([] = resumable)."""
    old = json.loads(ck["identity"])
    return sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
