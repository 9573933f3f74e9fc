"""Tar and Parquet shards as inputs (``nti_lightning.data.shards``): listing, counting, reading, bad samples."""

import io
import json
import logging
import tarfile
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset.tariterators as wds_tar
from shard_files import HF_IMAGE, encoded, hf_rows, img2dataset_shard, write_parquet, write_tar

from nti_lightning.data import shard_tar
from nti_lightning.data.image import ImageError, prepare_image
from nti_lightning.data.inputs import iter_items
from nti_lightning.data.items import read_captions
from nti_lightning.data.shards import (
    ShardRef,
    is_shard_input,
    is_shard_pattern,
    iter_shard,
    list_shards,
    read_sample,
    shard_size,
)
from nti_lightning.jobs.invert_items import decode
from nti_lightning.run.folder import WorkerId


@pytest.fixture
def img2dataset(tmp_path):
    """Two img2dataset shards (3 and 2 samples, jpg/png/webp), each with its metadata parquet beside it."""
    d = tmp_path / "shards"
    d.mkdir()
    samples = {**img2dataset_shard(d, 0, 3), **img2dataset_shard(d, 1, 2)}
    return d, samples


def test_tar_folder_gives_stem_key_ids_captions_and_bytes(img2dataset, caplog):
    d, samples = img2dataset
    with caplog.at_level(logging.WARNING, logger="nti_lightning.data.shards"):
        refs = list_shards([str(d)])
    assert refs == [ShardRef("tar", str(d / "00000.tar")), ShardRef("tar", str(d / "00001.tar"))]
    assert [r.name for r in refs] == ["00000", "00001"]
    assert "2 .parquet file(s) beside its .tar shards are not read" in caplog.text  # img2dataset's metadata
    items = [it for r in refs for it in iter_shard(r)]
    assert [it.id for it in items] == [f"{k[:5]}/{k}" for k in samples]
    for it in items:
        s = samples[it.key]
        assert it.error is None and it.data == s["data"] and it.prompt == s["caption"] and not it.captioned
        assert it.where == f"{d / it.id[:5]}.tar:{it.key}" and it.label == it.where and it.path.endswith(".tar")
    assert {samples[it.key]["ext"] for it in items} == {"jpg", "png", "webp"}
    assert [shard_size(r) for r in refs] == [3, 2]
    by_json = [it.prompt for it in iter_shard(refs[1], caption_column="url")]  # a .json field, over the .txt
    assert by_json == [f"https://example.com/{k}" for k in samples if k.startswith("00001")]
    again = [(it.id, it.prompt, it.data) for r in list_shards([str(d)]) for it in iter_shard(r)]
    assert again == [(it.id, it.prompt, it.data) for it in items]  # stable order


def test_brace_patterns_expand_like_webdataset(img2dataset):
    d, _ = img2dataset
    pattern = str(d / "{00000..00001}.tar")
    assert is_shard_pattern(pattern) and is_shard_input(pattern) and not is_shard_pattern(str(d / "00000.tar"))
    assert list_shards([pattern]) == list_shards([str(d)])
    assert [r.name for r in list_shards([str(d / "{00001,00000}.tar")])] == ["00001", "00000"]  # pattern order
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 shards of .* do not exist \(the first: .*00002.tar\)"):
        list_shards([str(d / "{00000..00002}.tar")])
    assert not is_shard_pattern(str(d / "a}b.tar"))  # unbalanced braces: a literal (missing) name
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards([str(d / "a}b.tar")])


def test_image_folders_are_not_shard_inputs(tmp_path):
    (tmp_path / "a.png").write_bytes(encoded())
    assert not is_shard_input(str(tmp_path)) and not is_shard_input(str(tmp_path / "a.png"))
    assert [it.id for it in iter_items([str(tmp_path)], None, "p")] == ["a"]


def test_parquet_row_groups_ids_and_caption_columns(tmp_path):
    cells = hf_rows(5)
    path = tmp_path / "train-00000-of-00001.parquet"
    write_parquet(path, {"image": cells, "caption": [f"c{i}" for i in range(5)], "alt": [f"a{i}" for i in range(5)]},
                  row_group_size=2)  # fmt: skip
    refs = list_shards([str(path)])
    assert [(r.kind, r.row_group, r.name) for r in refs] == [("parquet", g, path.stem) for g in range(3)]
    assert [shard_size(r) for r in refs] == [2, 2, 1]
    items = [it for r in refs for it in iter_shard(r)]
    assert [it.id for it in items] == [f"{path.stem}/{i}" for i in range(5)]  # row number in the file
    assert [it.prompt for it in items] == [f"c{i}" for i in range(5)]  # the first of prompt/caption/text
    assert [it.data for it in items] == [c["bytes"] for c in cells]
    assert items[3].where == f"{path}:3" and refs[1].label == f"{path} (row group 1)"
    alt = [it.prompt for r in refs for it in iter_shard(r, caption_column="alt")]
    assert alt == [f"a{i}" for i in range(5)]
    (nope,) = [it for it in iter_shard(refs[2], caption_column="missing")]
    assert "no column 'missing' (data.caption_column)" in nope.error and nope.error.startswith(f"{path}:4: ")


def test_parquet_key_column_and_binary_images(tmp_path):
    path = tmp_path / "wds.parquet"
    data = [encoded(seed=i) for i in range(3)]
    write_parquet(path, {"key": ["k0", "k1", "k2"], "jpg": data, "text": ["x", "y", "z"]}, types={"jpg": pa.binary()})
    items = [it for r in list_shards([str(path)]) for it in iter_shard(r)]
    assert [(it.id, it.prompt, it.data) for it in items] == [(f"wds/k{i}", "xyz"[i], data[i]) for i in range(3)]


def test_captions_file_overrides_by_id_or_key(img2dataset, tmp_path):
    d, _ = img2dataset
    cap = tmp_path / "captions.jsonl"
    rows = [{"image": "00000/000000000", "prompt": "by id"}, {"image": "000010001", "prompt": "by key"}]
    rows += [{"image": "000000002", "prompt": "one"}, {"image": "000000002", "prompt": "two"}]
    cap.write_text("".join(json.dumps(r) + "\n" for r in rows))
    captions, _ = read_captions(cap)
    try:
        got = {it.id: it for it in iter_items([str(d)], captions)}
    finally:
        captions.close()
    assert got["00000/000000000"].prompt == "by id" and got["00000/000000000"].captioned
    assert got["00001/000010001"].prompt == "by key"
    assert got["00000/000000001"].prompt == "photo 0 1" and not got["00000/000000001"].captioned  # its .txt
    assert got["00000/000000002"].error.endswith("2 different captions in --captions; keep one row")


def test_bad_tar_samples_fail_with_shard_key_and_the_shard_goes_on(tmp_path):
    png, ok = encoded("PNG"), b"a fine caption"
    members = [
        ("a.png", png), ("a.txt", ok),
        ("nojpg.txt", ok), ("nojpg.json", b"{}"),  # no image member
        ("two.jpg", encoded("JPEG")), ("two.png", png), ("two.txt", ok),  # two images for one key
        ("nocap.png", png), ("nocap.json", b'{"url": "x"}'),  # no caption anywhere
        ("twice.png", png), ("twice.png", png), ("twice.txt", ok),  # one member name twice
        ("latin.png", png), ("latin.txt", "café".encode("latin-1")),  # not UTF-8
        ("badjson.png", png), ("badjson.json", b"{oops"),  # the caption would be in a broken .json
        ("small.png", encoded("PNG", size=(12, 12))), ("small.txt", ok),  # decodes, too small
        ("junk.jpg", b"not an image at all"), ("junk.txt", ok),  # does not decode
        ("a.json", b"{}"),  # key "a" again, further on
        ("../../evil.png", png), ("../../evil.txt", ok),  # a path that must not leave the output folder
        ("z.webp", encoded("WEBP")), ("z.txt", ok),
    ]  # fmt: skip
    offsets = write_tar(tmp_path / "bad.tar", members)
    ref = ShardRef("tar", str(tmp_path / "bad.tar"))
    items = {it.id: it for it in iter_shard(ref)}
    assert shard_size(ref) == len(items) == 12
    where = f"{ref.path}:"

    def error(key):
        e = items[f"bad/{key}"].error
        assert e.startswith(f"{where}{key}: "), e
        return e

    assert "no image member (found .txt, .json); add nojpg.jpg/.png/.webp" in error("nojpg")
    assert "2 images for one key (.jpg, .png, .txt); keep one image per key" in error("two")
    assert "no caption (no nocap.txt and no prompt/caption/text in nocap.json); add it, give --captions" in error(
        "nocap"
    )
    assert "member twice.png appears twice; keep one" in error("twice")
    assert "latin.txt is not valid UTF-8" in error("latin")
    assert "badjson.json is not valid JSON" in error("badjson")
    again = items[f"bad/a@{offsets['a.json']}"]
    assert again.error == f"{where}a: key 'a' appears twice in the shard (also at byte 0); keep one sample per key"
    assert items["bad/evil"].where == f"{where}../../evil" and items["bad/evil"].error is None
    for key in ("a", "z", "small", "junk", "evil"):
        assert items[f"bad/{key}"].error is None and items[f"bad/{key}"].prompt == "a fine caption"
    assert decode(items["bad/z"], 32).shape == (3, 32, 32)
    small, junk = decode(items["bad/small"], 32), decode(items["bad/junk"], 32)
    assert isinstance(small, ImageError) and str(small).startswith(f"{where}small: 12×12 pixels is too small")
    assert isinstance(junk, ImageError) and str(junk).startswith(f"{where}junk: not an image Pillow can read")
    defaulted = {it.id: it for it in iter_shard(ref, default_prompt="dflt")}
    assert defaulted["bad/nocap"].prompt == "dflt" and defaulted["bad/nocap"].error is None


def _corrupt_copy(src, dst, at: int) -> None:
    raw = bytearray(src.read_bytes())
    raw[at : at + 512] = b"\x07" * 512  # a header whose checksum cannot match
    dst.write_bytes(bytes(raw))


def test_corrupt_tar_is_one_failed_item_at_its_byte_offset_then_the_next_shard(img2dataset):
    d, samples = img2dataset
    members = [m.name for m in tarfile.open(d / "00000.tar")]
    offsets = {m.name: m.offset for m in tarfile.open(d / "00000.tar")}
    at = offsets[members[4]]  # the second sample's .txt header
    _corrupt_copy(d / "00000.tar", d / "00000.tar", at)
    items = list(iter_items([str(d)], None))
    assert [it.id for it in items] == ["00000/000000000", "00000/000000001", f"00000/corrupt-at-byte-{at}"] + [
        f"00001/{k}" for k in samples if k.startswith("00001")
    ]
    bad = items[2]
    assert bad.error == (
        f"{d / '00000.tar'}:corrupt-at-byte-{at}: invalid tar header at byte {at}; the rest of the shard cannot be "
        "read: re-create or re-download it"
    )
    assert items[1].error.endswith(  # its .txt was the corrupt header, its .json after it
        f"no caption (no 000000001.txt and no prompt/caption/text in 000000001.json); add it, give --captions, or "
        f"set data.default_prompt (the shard is corrupt right after it, at byte {at}: members of it may be lost)"
    )
    assert shard_size(ShardRef("tar", str(d / "00000.tar"))) == 3
    assert all(it.error is None for it in items[3:])


def test_webdataset_tar_iterator_stops_silently_at_a_corrupt_header(img2dataset):
    """Why ``shard_tar`` walks the tar itself: webdataset's own iterator reports nothing at a corrupt header
    in the middle of a shard (it ends there, as if the shard ended)."""
    d, _ = img2dataset
    at = [m.offset for m in tarfile.open(d / "00000.tar")][4]
    _corrupt_copy(d / "00000.tar", d / "bad.tar", at)
    with open(d / "bad.tar", "rb") as f:
        names = [s["fname"] for s in wds_tar.tar_file_iterator(f)]  # the default handler re-raises: none came
    assert len(names) == 4 < len(list(tarfile.open(d / "00000.tar")))


def test_truncated_and_unreadable_tars(img2dataset, tmp_path):
    d, _ = img2dataset
    raw = (d / "00000.tar").read_bytes()
    m = [m for m in tarfile.open(d / "00000.tar")][6]  # the third sample's image
    (tmp_path / "cut.tar").write_bytes(raw[: m.offset_data + m.size // 2])
    items = list(iter_shard(ShardRef("tar", str(tmp_path / "cut.tar")), default_prompt="p"))
    assert [it.error is None for it in items] == [True, True, False, False]
    assert f"cut.tar:{m.name.split('.')[0]}: member {m.name} cannot be read" in items[2].error
    next_header = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # beyond the cut
    assert items[2].error.endswith(
        f"(the shard is corrupt right after it, at byte {next_header}: members of it may be lost)"
    )
    assert "unexpected end of data" in items[3].error and items[3].id.startswith("cut/corrupt-at-byte-")
    assert shard_size(ShardRef("tar", str(tmp_path / "cut.tar"))) == 4
    (tmp_path / "junk.tar").write_bytes(b"no tar here" * 100)
    (junk,) = iter_shard(ShardRef("tar", str(tmp_path / "junk.tar")))
    assert junk.id == "junk/corrupt-at-byte-0" and "not a readable tar file" in junk.error
    assert shard_size(ShardRef("tar", str(tmp_path / "junk.tar"))) == 1


def test_skipped_tar_samples_are_not_read(img2dataset, monkeypatch):
    d, samples = img2dataset
    read = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: read.append(m.name) or real(self, m))
    ref = ShardRef("tar", str(d / "00000.tar"))
    done = {"00000/000000000", "00000/000000002"}
    got = [it.id for it in iter_shard(ref, skip=done.__contains__)]
    assert got == ["00000/000000001"]
    assert sorted(read) == [f"000000001.{samples['000000001']['ext']}", "000000001.txt"]  # the .json is not needed


def test_tar_size_reads_headers_only(tmp_path, monkeypatch):
    members = []
    for i in range(6):
        members += [(f"{i:03d}.jpg", encoded("PNG", size=(256, 256), seed=i)), (f"{i:03d}.txt", b"x")]
    write_tar(tmp_path / "big.tar", members)
    total = (tmp_path / "big.tar").stat().st_size
    counted = []

    class Counting(io.FileIO):
        def read(self, n=-1):
            b = super().read(n)
            counted.append(len(b))
            return b

    monkeypatch.setattr(shard_tar.tarfile, "bltn_open", lambda p, mode: Counting(p, mode))
    assert shard_size(ShardRef("tar", str(tmp_path / "big.tar"))) == 6
    assert 0 < sum(counted) < total / 50  # 12 headers of 512 bytes (+ the end check), not ~1 MB of pixels


def test_parquet_skip_does_not_read_the_image_column_of_done_row_groups(tmp_path, monkeypatch):
    path = tmp_path / "p.parquet"
    write_parquet(path, {"image": hf_rows(6), "text": list("abcdef")}, row_group_size=3)
    batches = []
    real = pq.ParquetFile.iter_batches

    def spy(self, **kw):
        batches.append((kw["row_groups"], kw["columns"]))
        return real(self, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    done = {"p/0", "p/1", "p/2", "p/4"}
    got = [it.id for r in list_shards([str(path)]) for it in iter_shard(r, skip=done.__contains__)]
    assert got == ["p/3", "p/5"]
    assert batches == [([1], ["image"])]  # row group 0 is all done: its images are never read


def test_parquet_bad_rows_and_files(tmp_path, caplog):
    cells = hf_rows(4)
    cells[1] = {"bytes": None, "path": "elsewhere/b.png"}
    cells[3] = {"bytes": b"garbage", "path": None}
    path = tmp_path / "bad.parquet"
    write_parquet(path, {"image": cells, "prompt": ["p0", "p1", None, "p3"]})
    (ref,) = list_shards([str(path)])
    items = list(iter_shard(ref))
    assert [it.error is None for it in items] == [True, False, False, True]
    assert items[1].error == (
        f"{path}:1: no image bytes in column 'image' (only a path, 'elsewhere/b.png': store the images' bytes in "
        "the file)"
    )
    assert items[2].error.startswith(f"{path}:2: no caption (column 'prompt' is empty); add it, give --captions")
    err = decode(items[3], 32)
    assert isinstance(err, ImageError) and str(err).startswith(f"{path}:3: not an image Pillow can read")
    # a file that is not Parquet: one failed item (read at listing time: its footer is missing)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet" * 10)
    (junk,) = list_shards([str(tmp_path / "junk.parquet")])
    assert junk.row_group is None and shard_size(junk) == 1
    (bad,) = iter_shard(junk)
    assert bad.id == "junk/unreadable" and "cannot read the Parquet file" in bad.error
    # no image column: an error when named, one log line in a folder
    meta = tmp_path / "meta"
    meta.mkdir()
    write_parquet(meta / "m.parquet", {"key": ["a"], "caption": ["c"]})
    with pytest.raises(ValueError, match=r"m.parquet has no image column \(columns: key, caption\)"):
        list_shards([str(meta / "m.parquet")])
    write_parquet(meta / "n.parquet", {"image": hf_rows(1), "caption": ["c"]})
    with caplog.at_level(logging.WARNING, logger="nti_lightning.data.shards"):
        assert [r.path for r in list_shards([str(meta)])] == [str(meta / "n.parquet")]
    assert "m.parquet has no image column (columns: key, caption): not read as images" in caplog.text


def test_parquet_image_column_choice(tmp_path):
    path = tmp_path / "edit.parquet"
    src, dst = hf_rows(2), hf_rows(2, seed=10)
    write_parquet(
        path, {"source": src, "target": dst, "text": ["a", "b"]}, types={"source": HF_IMAGE, "target": HF_IMAGE}
    )
    with pytest.raises(ValueError, match=r"several image columns \(source, target\); choose one with data.image_col"):
        list_shards([str(path)])
    refs = list_shards([str(path)], image_column="target")
    assert [it.data for it in iter_shard(refs[0], image_column="target")] == [c["bytes"] for c in dst]
    with pytest.raises(ValueError, match="column 'text' holds string, not image bytes"):
        list_shards([str(path)], image_column="text")


def test_row_group_shards_split_across_two_workers_cover_every_row_once(tmp_path, monkeypatch):
    path = tmp_path / "one-big.parquet"
    n = 23
    write_parquet(path, {"image": hf_rows(n), "caption": [str(i) for i in range(n)]}, row_group_size=4)
    refs = list_shards([str(path)])
    assert len(refs) == 6
    opened = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kw: opened.append(i) or real(self, i, **kw))  # fmt: skip
    per_worker = []
    for task in range(2):  # data.shard_index of data.num_shards=2, by shard rather than by item
        opened.clear()
        mine = [r for k, r in enumerate(refs) if WorkerId(task, 2, 0, 1).is_mine(k)]
        per_worker.append([it.id for r in mine for it in iter_shard(r)])
        assert opened == [r.row_group for r in mine]  # each task reads only its own row groups
    assert sorted(per_worker[0] + per_worker[1], key=lambda i: int(i.split("/")[1])) == [
        f"one-big/{i}" for i in range(n)
    ]
    assert not set(per_worker[0]) & set(per_worker[1])
    assert sum(shard_size(r) for r in refs) == n


def test_shard_names_must_be_unique(img2dataset, tmp_path):
    d, _ = img2dataset
    other = tmp_path / "other"
    other.mkdir()
    img2dataset_shard(other, 0, 1)
    with pytest.raises(ValueError, match="two shards named '00000'"):
        list_shards([str(d), str(other)])
    with pytest.raises(ValueError, match="two shards named '00000'"):
        list(iter_items([str(d), str(other)], None))
    with pytest.raises(ValueError, match="listed twice"):
        list_shards([str(d / "00000.tar"), str(d / "{00000,00001}.tar")])


def test_items_restored_without_bytes_are_read_again(img2dataset, tmp_path):
    d, _ = img2dataset
    path = tmp_path / "p.parquet"
    write_parquet(path, {"image": hf_rows(5), "text": list("abcde")}, row_group_size=2)
    items = [it for inp in (str(d), str(path)) for r in list_shards([inp]) for it in iter_shard(r)]
    for it in items:
        bare = replace(it, data=None)  # as a checkpoint holds it
        assert read_sample(bare) == it.data
        assert torch.equal(decode(bare, 32), decode(it, 32))
    gone = replace(items[0], data=None, key="nope")
    with pytest.raises(ImageError, match="no longer in the shard"):
        read_sample(gone)


def test_prepare_image_from_bytes_matches_the_file(tmp_path):
    data = encoded("JPEG", size=(80, 60))
    (tmp_path / "x.jpg").write_bytes(data)
    assert torch.equal(prepare_image(data, 64, name="s.tar:x"), prepare_image(tmp_path / "x.jpg", 64))
    with pytest.raises(ImageError, match=r"^s.tar:cut: unreadable or truncated image"):
        prepare_image(data[: len(data) // 2], 64, name="s.tar:cut")
    with pytest.raises(ImageError, match=r"^image bytes: not an image Pillow can read"):
        prepare_image(b"\x00" * 100, 64)


def test_a_whole_parquet_file_as_one_shard(tmp_path):
    """``row_group=None`` (what listing gives a file whose footer it could not read) reads every row group."""
    path = tmp_path / "w.parquet"
    write_parquet(path, {"image": hf_rows(5), "prompt": list("abcde")}, row_group_size=2)
    whole = ShardRef("parquet", str(path))
    assert shard_size(whole) == 5
    assert [it.id for it in iter_shard(whole)] == [it.id for r in list_shards([str(path)]) for it in iter_shard(r)]
