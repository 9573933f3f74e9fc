"""PIE-Bench-format loader: RLE convention, validation lines, the shipped sample."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nti_lightning.eval.pie import (
    EDITING_TYPES,
    RleError,
    decode_rle,
    encode_rle,
    load_pie,
    mask_at,
    pie_border,
    strip_brackets,
)

SAMPLE = Path(__file__).resolve().parents[2] / "nti_lightning" / "assets" / "pie_sample"


def test_decode_rle_is_row_major_start_length_pairs():
    m = decode_rle([0, 3, 512 + 10, 2, 512 * 512 - 1, 1])
    assert m.shape == (512, 512) and m.dtype == bool
    assert m[0, :3].all() and not m[0, 3]
    assert m[1, 10:12].all() and m[1].sum() == 2
    assert m[-1, -1] and m.sum() == 6


def test_encode_decode_roundtrip():
    rng = np.random.default_rng(0)
    mask = rng.random((512, 512)) > 0.7
    mask[0, 0] = mask[-1, -1] = True
    runs = encode_rle(mask)
    assert np.array_equal(decode_rle(runs), mask)
    assert encode_rle(np.zeros((512, 512), bool)) == []


@pytest.mark.parametrize(
    "runs, words",
    [([0, 1, 5], "odd length"), ([-1, 3], "negative"), ([512 * 512 - 2, 3], "past"), ([0, 1.5], "integer")],
)
def test_decode_rle_rejects_bad_runs(runs, words):
    with pytest.raises(RleError, match=words):
        decode_rle(runs)


def test_strip_brackets_and_border_and_mask_at():
    assert strip_brackets("a [red] car [on a road]") == "a red car on a road"
    assert strip_brackets("[ ] a cat") == "a cat"
    b = pie_border(np.zeros((512, 512), bool))
    assert b[0].all() and b[:, -1].all() and b.sum() == 4 * 511
    m = np.zeros((512, 512), bool)
    m[:256, :256] = True
    small = mask_at(m, 64)
    assert small.shape == (64, 64) and small[:32, :32].all() and small.sum() == 32 * 32


def test_sample_loads_one_entry_per_type():
    entries, errors = load_pie(SAMPLE)
    assert errors == []
    assert len(entries) == 10
    assert sorted(e.editing_type_id for e in entries) == sorted(EDITING_TYPES)
    for e in entries:
        img = e.load_image()
        assert img.shape == (512, 512, 3) and img.dtype == np.uint8
        assert 0 < e.mask.sum() <= 512 * 512
        assert "[" not in e.target_prompt and e.target_prompt != e.source_prompt
    assert sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file()) < 1.5e6


def _copy_sample(tmp_path: Path) -> tuple[Path, dict]:
    dst = tmp_path / "pie"
    shutil.copytree(SAMPLE, dst)
    return dst, json.loads((dst / "mapping_file.json").read_text())


def test_bad_entries_give_one_line_each_and_the_rest_load(tmp_path):
    folder, mapping = _copy_sample(tmp_path)
    ids = list(mapping)
    mapping[ids[0]]["colour"] = "x"  # unknown key
    del mapping[ids[1]]["blended_word"]  # missing key
    mapping[ids[2]]["image_path"] = "nowhere/none.jpg"  # missing image
    mapping[ids[3]]["mask"] = [0, 10, 512 * 512, 5]  # run past the end
    mapping[ids[4]]["mask"] = [0, 10, 20]  # odd length
    mapping[ids[5]]["editing_type_id"] = "12"  # not 0-9
    (folder / "mapping_file.json").write_text(json.dumps(mapping))
    entries, errors = load_pie(folder)
    assert len(entries) == 4 and len(errors) == 6
    by_id = {e.entry_id: str(e) for e in errors}
    assert "unknown key(s) colour" in by_id[ids[0]]
    assert "missing key(s) blended_word" in by_id[ids[1]]
    assert "not found" in by_id[ids[2]] and "image_path" in by_id[ids[2]]
    assert "512x512" in by_id[ids[3]] and "past" in by_id[ids[3]]
    assert "odd length" in by_id[ids[4]]
    assert "not 0-9" in by_id[ids[5]]
    for line in by_id.values():
        assert "\n" not in line and "mapping_file.json" in line and "fix:" in line


def test_missing_or_broken_mapping_file(tmp_path):
    entries, errors = load_pie(tmp_path)
    assert entries == [] and "file not found" in str(errors[0])
    (tmp_path / "mapping_file.json").write_text("{not json")
    assert "not valid JSON" in str(load_pie(tmp_path)[1][0])


def test_sample_script_is_deterministic(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_pie_sample.py"
    spec = importlib.util.spec_from_file_location("make_pie_sample", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_sample(tmp_path)
    assert (tmp_path / "mapping_file.json").read_bytes() == (SAMPLE / "mapping_file.json").read_bytes()
    images = SAMPLE / "annotation_images"
    for p in images.rglob("*.jpg"):
        assert (tmp_path / "annotation_images" / p.relative_to(images)).read_bytes() == p.read_bytes()
