"""Memory and speed of streaming a dataset's items: a JSONL list of N images (paths need not exist; nothing is
decoded) iterated with ``iter_items`` and the runner's static split, as one worker of a sharded run does.

    python scripts/bench_item_stream.py [--n 1000000] [--num-shards 4] [--shard 1] [--world 2] [--rank 1]

Prints the peak RSS of the process (``resource.getrusage``) before and after the pass, and the seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nti_lightning.data.inputs import iter_items  # noqa: E402


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib / (1024 * 1024 if sys.platform == "darwin" else 1024)


def write_list(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for k in range(n):
            f.write(json.dumps({"image": f"part{k // 10000:04d}/img{k:08d}.jpg", "prompt": f"a photo of thing {k}"}))
            f.write("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="rows in the list file")
    ap.add_argument("--num-shards", type=int, default=4)
    ap.add_argument("--shard", type=int, default=1)
    ap.add_argument("--world", type=int, default=2, help="ranks per shard")
    ap.add_argument("--rank", type=int, default=1)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        lst = Path(tmp) / "images.jsonl"
        t0 = time.perf_counter()
        write_list(lst, args.n)
        t_write, mib = time.perf_counter() - t0, lst.stat().st_size / 2**20
        rss0 = peak_rss_mib()

        t0 = time.perf_counter()
        total = mine = with_error = 0
        for k, item in enumerate(iter_items([str(lst)], None)):
            total += 1
            if k % args.num_shards == args.shard and (k // args.num_shards) % args.world == args.rank:
                mine += 1
                with_error += item.error is not None
        seconds = time.perf_counter() - t0
        rss1 = peak_rss_mib()

    print(
        f"{total:,} items ({mib:.0f} MiB list written in {t_write:.1f} s), "
        f"{mine:,} of them for shard {args.shard}/{args.num_shards} rank {args.rank}/{args.world} "
        f"({with_error} with an error)"
    )
    print(f"one streaming pass: {seconds:.1f} s ({1e6 * seconds / max(total, 1):.1f} µs/item)")
    print(f"peak RSS: {rss0:.0f} MiB before the pass, {rss1:.0f} MiB after (+{rss1 - rss0:.0f} MiB)")


if __name__ == "__main__":
    main()
