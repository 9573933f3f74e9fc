"""Builds dataset shards for the tests: img2dataset-style tar shards and Hugging Face-style Parquet files."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
"""The Arrow type of a Hugging Face ``datasets.Image`` column."""
FORMATS = ("JPEG", "PNG", "WEBP")
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def encoded(fmt: str = "PNG", size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    """A random RGB image of ``size`` (w, h), encoded as ``fmt``."""
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> dict[str, int]:
    """A tar of ``members`` (name, data) in order; returns each member's header byte offset."""
    offsets = {}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            offsets[name] = tar.offset
            tar.addfile(info, io.BytesIO(data))
    return offsets


def img2dataset_shard(folder: Path, shard: int, n: int, per_shard: int = 10_000) -> dict[str, dict]:
    """``folder/{shard:05d}.tar`` as img2dataset writes it (``KEY.jpg|png|webp`` + ``.txt`` + ``.json``, keys
    ``{shard:05d}{i:04d}``), with its metadata ``.parquet`` (no image bytes) and ``_stats.json`` beside it.
    Returns key → {"data", "caption", "ext"}."""
    samples, members = {}, []
    for i in range(n):
        key = f"{shard:05d}{i:04d}"
        fmt = FORMATS[(shard + i) % 3]
        data, caption = encoded(fmt, seed=shard * per_shard + i), f"photo {shard} {i}"
        samples[key] = {"data": data, "caption": caption, "ext": EXT[fmt]}
        meta = {"key": key, "caption": caption, "url": f"https://example.com/{key}", "status": "success"}
        members += [
            (f"{key}.{EXT[fmt]}", data),
            (f"{key}.txt", caption.encode()),
            (f"{key}.json", json.dumps(meta).encode()),
        ]
    write_tar(folder / f"{shard:05d}.tar", members)
    keys = list(samples)
    meta = pa.table({"key": keys, "caption": [samples[k]["caption"] for k in keys], "status": ["success"] * n})
    pq.write_table(meta, folder / f"{shard:05d}.parquet")
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": n, "successes": n}))
    return samples


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int | None = None, types=None) -> None:
    """A Parquet file of ``columns``; a column named in ``types`` gets that Arrow type (default: inferred, and
    ``HF_IMAGE`` for a column named ``image``)."""
    types = {"image": HF_IMAGE, **(types or {})}
    arrays = {k: pa.array(v, type=types.get(k)) for k, v in columns.items()}
    pq.write_table(pa.table(arrays), path, row_group_size=row_group_size)


def hf_rows(n: int, seed: int = 0, fmt: str = "PNG") -> list[dict]:
    """``n`` Hugging Face image cells ``{bytes, path}``."""
    return [{"bytes": encoded(fmt, seed=seed + i), "path": f"img{i}.{EXT[fmt]}"} for i in range(n)]
