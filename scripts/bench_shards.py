"""Speed of reading dataset shards (``nti_lightning.data.shards``): one img2dataset-style tar shard and one
Hugging Face-style Parquet file of N samples each, written to a temporary folder, then counted
(``shard_size``), read in full (``iter_shard``: ids, captions and image bytes; nothing is decoded) and read with
every sample skipped (``skip`` → True: what a resumed worker does for its finished samples).

    python scripts/bench_shards.py [--n 10000] [--side 256] [--row-group 100] [--out benchmarks/results/shard-inputs]

The files are read right after being written (warm page cache): the numbers are the readers' own cost, not
the disk's. Prints a Markdown table and writes it to ``OUT/bench.md`` with the command line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nti_lightning.data.shards import iter_shard, list_shards, shard_size  # noqa: E402

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def jpeg(side: int, seed: int) -> bytes:
    """A smooth random-colour gradient with light noise: JPEG sizes like a photo's, not like pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    base = rng.random(3) * 255 * x[..., None] + rng.random(3) * 255 * y[..., None] / 2
    arr = np.clip(base + rng.normal(0, 6, (side, side, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: Path, n: int, side: int, row_group: int) -> tuple[Path, Path]:
    images = [jpeg(side, k % 64) for k in range(n)]  # 64 distinct images, repeated: writing stays quick
    tar_path, pq_path = folder / "00000.tar", folder / "train-00000-of-00001.parquet"
    with tarfile.open(tar_path, "w") as tar:
        for k, data in enumerate(images):
            key = f"{k:09d}"
            for ext, payload in (("jpg", data), ("txt", f"a photo of thing {k}".encode()),
                                 ("json", json.dumps({"key": key, "status": "success"}).encode())):  # fmt: skip
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    cells = pa.array([{"bytes": d, "path": f"{k}.jpg"} for k, d in enumerate(images)], type=HF_IMAGE)
    table = pa.table({"image": cells, "text": [f"a photo of thing {k}" for k in range(n)]})
    # no dictionary for the images: they repeat here (quick to write), in a real dataset they do not
    pq.write_table(table, pq_path, row_group_size=row_group, use_dictionary=["text"])
    return tar_path, pq_path


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def read_all(refs, skip=None) -> tuple[int, int]:
    n = nbytes = 0
    for r in refs:
        for it in iter_shard(r, skip=skip):
            n += 1
            nbytes += len(it.data or b"")
    return n, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="samples per shard")
    ap.add_argument("--side", type=int, default=256, help="image side in pixels")
    ap.add_argument("--row-group", type=int, default=100, help="Parquet rows per row group (datasets writes 100)")
    ap.add_argument("--out", type=Path, default=None, help="folder for bench.md")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tar_path, pq_path = write_shards(Path(tmp), args.n, args.side, args.row_group)
        for label, path in (("tar", tar_path), ("parquet", pq_path)):
            mib = path.stat().st_size / 2**20
            t_list, refs = timed(lambda p=path: list_shards([str(p)]))
            t_size, size = timed(lambda r=refs: sum(shard_size(x) for x in r))
            t_full, (n, nbytes) = timed(lambda r=refs: read_all(r))
            t_skip, (n_skip, _) = timed(lambda r=refs: read_all(r, skip=lambda _id: True))
            assert size == n == args.n and n_skip == 0
            rows.append(
                f"| {label} | {args.n:,} | {mib:.0f} | {len(refs)} | {1e3 * t_list:.1f} | {1e3 * t_size:.1f} | "
                f"{t_full:.2f} ({args.n / t_full:,.0f}/s, {nbytes / 2**20 / t_full:.0f} MiB/s) | {t_skip:.2f} |"
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    table = [
        "| shard | samples | MiB | shards listed | list_shards ms | shard_size ms | full read s | all skipped s |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(
        [
            f"`python scripts/bench_shards.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
            "",
            *table,
            "",
            f"peak RSS {rss:.0f} MiB; {os.cpu_count()} CPU cores, load average {load} (1, 5, 15 min) at the end",
        ]  # fmt: skip
    )
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
