"""``open_run(OUTPUT).as_dataset()``: a run's inversions as a ``torch.utils.data.Dataset`` for downstream training.

Item k is the k-th record in shard order (``store.reader``): shard records by (worker, shard, offset), then
folders-layout records in manifest order. The dataset holds the reader's arrays and paths, never an open
file, so DataLoader workers (fork or spawn) each open the shards they read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from nti_lightning.store.inversion import NULL_EXTRA_PREFIX, OPTIONAL_TENSOR_FIELDS, TENSOR_FIELDS, Inversion


def record_tensors(item_id: str, inv: Inversion) -> dict:
    """The default item: ``id``, ``prompt`` and every tensor of the record (optional ones where present;
    ``null_extra`` as ``null_embeddings.<key>``)."""
    out: dict = {"id": item_id, "prompt": inv.prompt}
    for name in TENSOR_FIELDS + OPTIONAL_TENSOR_FIELDS:
        value = getattr(inv, name)
        if value is not None:
            out[name] = value
    out.update({NULL_EXTRA_PREFIX + k: v for k, v in inv.null_extra.items()})
    return out


class InversionDataset(Dataset):
    """The records of a ``RunReader`` by position (module docstring)."""

    def __init__(self, reader, transform: Callable[[str, Inversion], object] | None = None) -> None:
        self.reader = reader
        self.transform = transform or record_tensors

    def __len__(self) -> int:
        return len(self.reader.locations) + len(self.reader.folder_records())

    def __getitem__(self, k: int):
        if isinstance(k, torch.Tensor):
            k = int(k)
        n_shard = len(self.reader.locations)
        if not -len(self) <= k < len(self):
            raise IndexError(f"record {k} of {len(self)}")
        k %= len(self)
        if k < n_shard:
            item_id, inv = self.reader.read_location(k)
        else:
            item_id, rel = self.reader.folder_records()[k - n_shard]
            inv = self.reader._load_file(self.reader.root / rel)
        return self.transform(item_id, inv)
