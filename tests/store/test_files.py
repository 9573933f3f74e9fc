"""The one atomic-write helper: temp file in the worker's temporary folder, fsync, rename; a failed write leaves
the old file and no temporary file; paths that would leave their root are refused."""

import os

import pytest

from nti_lightning.store.files import (
    HOST,
    IMAGES_DIR,
    OutsideRootError,
    atomic_write,
    clear_folder,
    inside,
    item_relpath,
    remove_stale_tmp,
)


def test_atomic_write_replaces_whole_and_uses_the_temporary_folder(tmp_path):
    tmp = tmp_path / ".nti" / "tmp" / "rank0"
    tmp.mkdir(parents=True)
    target = tmp_path / "images" / "a" / "meta.json"
    atomic_write(target, b"one", tmp)
    seen = []

    def writer(f):
        seen.extend(os.listdir(tmp))  # while writing, the temporary file is in the worker's folder
        f.write(b"two")

    atomic_write(target, writer, tmp)
    assert target.read_bytes() == b"two" and len(seen) == 1 and seen[0].endswith(".tmp")
    assert os.listdir(tmp) == [] and os.listdir(target.parent) == ["meta.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")

    def boom(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_clear_and_stale_temporaries(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / ".x.tmp").write_bytes(b"")
    assert clear_folder(tmp_path / "w") == 1 and not os.listdir(tmp_path / "w")
    dead, alive = 2**22 + 12345, os.getpid()
    (tmp_path / f".a.{HOST}-{dead}-0.tmp").write_bytes(b"")
    (tmp_path / f".b.{HOST}-{alive}-0.tmp").write_bytes(b"")
    (tmp_path / ".c.otherhost-1-0.tmp").write_bytes(b"")
    assert remove_stale_tmp(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == [f".b.{HOST}-{alive}-0.tmp", ".c.otherhost-1-0.tmp"]


def test_per_image_paths_stay_in_their_namespace(tmp_path):
    assert item_relpath("config.yaml") == f"{IMAGES_DIR}/config.yaml"
    assert item_relpath("shard/key").count("/") == 1  # one component under images/
    assert item_relpath("x", subdirs=True).startswith(f"{IMAGES_DIR}/") and item_relpath("x", True).count("/") == 2
    assert inside(tmp_path, "images/a") == tmp_path / "images/a"
    for bad in ("../x", "images/../../x", "/etc/passwd"):
        with pytest.raises(OutsideRootError):
            inside(tmp_path, bad)
