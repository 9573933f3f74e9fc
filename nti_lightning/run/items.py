"""This worker's items: the static shard of the input stream, minus what is done, decoded ahead of use."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from nti_lightning.data.image import ImageError, prepare_image
from nti_lightning.data.items import Item
from nti_lightning.data.shards import read_sample
from nti_lightning.store.manifest import ManifestIndex


def is_mine(k: int, shard: int, num_shards: int, rank: int, world: int) -> bool:
    """The static split: item k → job (shard) k mod S, then rank (k div S) mod world."""
    return k % num_shards == shard and (k // num_shards) % world == rank


def lost_inversions(out_dir: Path, previous: ManifestIndex, item_id: str) -> bool:
    """An id recorded "ok" whose inversion file is gone (deleted by hand, a lost disk): it is redone."""
    prev = previous.get(item_id)
    return (
        prev is not None
        and prev.status == "ok"
        and (prev.inversion is None or not (out_dir / prev.inversion).is_file())
    )


def decode(item: Item, size: int) -> torch.Tensor | Exception:
    """The item's pixels (3, size, size) in [-1, 1], or the error that names the file (``SHARD:KEY``) and the fix."""
    try:
        if item.error:
            raise ValueError(item.error)
        if item.key is not None:  # a shard sample: its bytes, read with it or (restored from a checkpoint) again
            data = item.data if item.data is not None else read_sample(item)
            return prepare_image(data, size, name=item.label)
        if item.where is not None and not os.path.isfile(item.path):
            raise ImageError(
                f"{item.where}: image {item.path} not found; fix the path (relative paths are relative to the "
                "list file's folder) or remove the row"
            )
        return prepare_image(item.path, size, name=item.label)
    except (ImageError, ValueError, OSError) as e:
        return e


def prefetched(
    items: Iterator[tuple[int, Item]], load: Callable[[Item], object], lookahead: int
) -> Iterator[tuple[int, Item, object]]:
    """``(k, item, load(item))`` in order, with up to ``lookahead`` items loaded ahead in a background thread."""
    if lookahead == 0:
        yield from ((k, it, load(it)) for k, it in items)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nti-decode") as pool:
        queue: deque = deque()
        for k, it in items:
            queue.append((k, it, pool.submit(load, it)))
            if len(queue) > lookahead:
                k0, head, fut = queue.popleft()
                yield k0, head, fut.result()
        while queue:
            k0, head, fut = queue.popleft()
            yield k0, head, fut.result()
