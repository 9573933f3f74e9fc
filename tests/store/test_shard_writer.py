"""Output shards: member keys derived from ids, records appended in groups and rolled into finished tars with
an id → offset index, a torn or uncommitted tail cut back to the last committed record, files readable by
tarfile and webdataset."""

from __future__ import annotations

import json
import tarfile

import pytest
import webdataset as wds

from nti_lightning.store.shard_writer import ShardWriter
from nti_lightning.store.tar_records import (
    MAX_KEY_BYTES,
    finish_bytes,
    index_file,
    member_key,
    read_member,
    read_span,
    scan,
)


def _record(i: int, size: int = 700) -> tuple[str, list[tuple[str, bytes]]]:
    item_id = f"shard/{i:04d}"
    return item_id, [("inversion.safetensors", bytes([i % 251]) * size), ("json", json.dumps({"id": item_id}).encode())]


def _ids_in(path) -> list[str]:
    with tarfile.open(path) as tar:
        return [json.loads(tar.extractfile(m).read())["id"] for m in tar if m.name.endswith(".json")]


def test_member_keys_are_injective_and_safe_for_webdataset():
    ids = ["a/b", "a%2Fb", "a.b", "a%2Eb", "a b", "a\\b", "ü/ñ.jpg", "x" * 300, "x" * 300 + "y", "00000/000000001"]
    keys = [member_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert not any("." in k or "/" in k for k in keys)
    assert all(len(k.encode()) <= MAX_KEY_BYTES for k in keys)
    assert member_key("00000/000000001") == "00000%2F000000001"


def test_groups_roll_into_finished_shards_with_an_index(tmp_path):
    w = ShardWriter(tmp_path, "rank0", max_images=5)
    where = []
    for g in range(4):  # groups of 3: a shard is finished before a group would take it past 5 records
        where += w.append([_record(3 * g + k) for k in range(3)])
    w.finish()
    shards = tmp_path / "shards"
    assert sorted(p.name for p in shards.iterdir()) == [
        f"rank0-{n:06d}.{ext}" for n in range(4) for ext in ("index.json", "tar")
    ]
    assert [n for n, _ in where] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for n in range(4):
        path = shards / f"rank0-{n:06d}.tar"
        assert _ids_in(path) == [f"shard/{i:04d}" for i in range(3 * n, 3 * n + 3)]  # tarfile reads it whole
        index = json.loads((shards / f"rank0-{n:06d}.index.json").read_text())
        assert index["ids"] == _ids_in(path) and index["records"] == 3
        assert index["offsets"] == [off for s, off in where if s == n]
        with open(path, "rb") as f:
            for item_id, off in zip(index["ids"], index["offsets"]):
                span = read_span(f, off)
                assert json.loads(read_member(f, span, "json"))["id"] == item_id
    samples = list(wds.WebDataset(str(shards / "rank0-000001.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [member_key(f"shard/{i:04d}") for i in (3, 4, 5)]
    assert samples[0]["inversion.safetensors"] == bytes([3]) * 700


def test_shards_roll_by_size(tmp_path):
    w = ShardWriter(tmp_path, "shard1.rank0", max_bytes=4000)
    for i in range(6):
        w.append([_record(i)])  # 700 + 2 pax/ustar headers + padding ≈ 2.5 KB a record
    w.finish()
    tars = sorted((tmp_path / "shards").glob("*.tar"))
    assert [p.name for p in tars] == [f"shard1.rank0-{n:06d}.tar" for n in range(6)]
    assert all(p.stat().st_size <= 4000 + len(finish_bytes()) for p in tars)


def test_no_shard_rolls_for_its_size_before_min_images(tmp_path):
    """Heavy records (SD1.5 or SDXL in fp32) still fill a shard with min_images of them: few files per image."""
    w = ShardWriter(tmp_path, "rank0", max_bytes=4000, min_images=3)
    for i in range(7):
        w.append([_record(i)])
    w.finish()
    tars = sorted((tmp_path / "shards").glob("*.tar"))
    counts = [json.loads((tmp_path / "shards" / index_file(p.name)).read_text())["records"] for p in tars]
    assert counts == [3, 3, 1]
    assert tars[0].stat().st_size > 4000  # past max_bytes: the minimum comes first


@pytest.mark.parametrize("tail", ["uncommitted", "torn", "finished"])
def test_reopening_cuts_back_to_the_last_committed_record(tmp_path, tail):
    w = ShardWriter(tmp_path, "rank0")
    committed = w.append([_record(0), _record(1)]) + w.append([_record(2)])
    part = tmp_path / "shards" / "rank0-000000.tar.part"
    end = part.stat().st_size
    if tail == "uncommitted":  # appended and fsynced, killed before the index entries
        w.append([_record(3), _record(4)])
    elif tail == "torn":  # killed half-way through a write
        w.close()
        with open(part, "ab") as f:
            f.write(b"\x00garbage" * 100)
    else:  # killed after the end-of-archive blocks, before the rename
        w.close()
        with open(part, "ab") as f:
            f.write(finish_bytes())
    w.close()
    lines = []
    w2 = ShardWriter(tmp_path, "rank0", committed, log=lines.append)
    assert part.stat().st_size == end and any("cut" in x for x in lines)
    assert w2.append([_record(5)]) == [(0, end)]  # appending goes on in the same shard
    w2.finish()
    assert _ids_in(tmp_path / "shards" / "rank0-000000.tar") == ["shard/0000", "shard/0001", "shard/0002", "shard/0005"]
    with open(tmp_path / "shards" / "rank0-000000.tar", "rb") as f:
        assert [s.offset for s in scan(f)] == [off for _, off in committed] + [end]


def test_a_part_without_committed_records_is_emptied_and_a_later_worker_starts_after_finished_shards(tmp_path):
    w = ShardWriter(tmp_path, "rank1", max_images=2)
    first = w.append([_record(0), _record(1)])
    w.append([_record(2)])  # finishes shard 0; shard 1 holds one uncommitted record
    w.close()
    w2 = ShardWriter(tmp_path, "rank1", first)
    assert (tmp_path / "shards" / "rank1-000001.tar.part").stat().st_size == 0
    assert w2.append([_record(7)]) == [(1, 0)]
    w2.finish()
    w3 = ShardWriter(tmp_path, "rank1")
    assert w3.append([_record(8)]) == [(2, 0)]  # numbering goes on after the finished shards
