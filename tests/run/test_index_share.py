"""A worker that reads only its own input shards loads only their index entries (its memory follows its share),
and its own index file whole; ``nti status`` and a plain-input worker load everything."""

from __future__ import annotations

import numpy as np

from nti_lightning.store.records import FAILED, OK, RecordLog, RunIndex, done_by_source, short_hash


def _log(root, name):
    return RecordLog(root / f"manifest.{name}.jsonl", root / ".nti/index" / f"{name}.idx",
                     root / ".nti/failures" / f"{name}.jsonl")  # fmt: skip


def test_a_worker_loads_its_sources_entries_and_its_own_file(tmp_path):
    a, b = short_hash("00000:1024"), short_hash("00001:1024")
    w0, w1 = _log(tmp_path, "shard0.rank0"), _log(tmp_path, "shard1.rank0")
    w0.append({"id": "00000/1", "finished_at": 1.0}, OK, source=a, out_shard=0, out_offset=0)
    w0.append({"id": "00001/1", "finished_at": 2.0}, OK, source=b, out_shard=0, out_offset=512)  # split changed
    w1.append({"id": "00001/2", "finished_at": 3.0}, FAILED, source=b)
    w1.append({"id": "00000/2", "finished_at": 4.0}, OK, source=a, out_shard=0, out_offset=0)
    whole = RunIndex.load(tmp_path)
    assert len(whole) == 4 and whole.workers == ["shard0.rank0", "shard1.rank0"]
    mine = RunIndex.load(tmp_path, sources=np.array([b], np.uint64), whole="shard1.rank0")
    assert sorted(mine.entries["source"].tolist()) == sorted([b, b, a])  # b's from both files, shard1's whole
    assert mine.get("00000/1") is None and mine.get("00001/1") is not None
    assert mine.worker_of(mine.position("00001/1")) == "shard0.rank0"  # where its output is
    assert done_by_source(whole.entries, whole.entries["status"] == OK, whole.entries["status"] == FAILED) == {
        a: (2, 0), b: (1, 1)}  # fmt: skip
