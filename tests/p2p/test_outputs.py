"""``p2p.outputs``: an edit's four files, the naming rule (never overwrite, never a stale attention map), the
settings record."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from nti_lightning.edit_config import EditConfig
from nti_lightning.p2p import edit
from nti_lightning.p2p.outputs import claim_stem, edit_files, save_edit, slug

from .helpers import DOG


@pytest.fixture(scope="module")
def result(random_model, inv):
    return edit(random_model, inv, DOG, return_attention=True)


def write_edit(folder, stem, result, config):
    return save_edit(folder, stem, result, 1, result.images[0], {"target": DOG}, config)


def test_slug_never_contains_the_number_separator():
    assert slug("A dog -- 2!") == "a_dog_2" and slug("???") == "edit" and len(slug("word " * 40)) == 48


def test_a_taken_stem_gets_the_next_number(tmp_path):
    assert claim_stem(tmp_path, "dog") == "dog" and (tmp_path / "dog.json").is_file()  # claimed at once
    assert claim_stem(tmp_path, "dog") == "dog-2"
    assert claim_stem(tmp_path, "dog") == "dog-3"
    (tmp_path / "cat_attention.png").write_bytes(b"old")  # any one of the four files takes the name
    assert claim_stem(tmp_path, "cat") == "cat-2"
    assert (tmp_path / "cat_attention.png").read_bytes() == b"old"


def test_overwrite_removes_every_file_of_the_earlier_edit(tmp_path):
    for path in edit_files(tmp_path, "dog").values():
        path.write_bytes(b"old")
    (tmp_path / "dog-2.png").write_bytes(b"other edit")
    assert claim_stem(tmp_path, "dog", overwrite=True) == "dog"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog-2.png", "dog.json"]
    assert (tmp_path / "dog.json").read_bytes() == b""


def test_no_edit_is_overwritten_and_no_stale_attention_map_is_left(tmp_path, result):
    first = write_edit(tmp_path, "dog", result, EditConfig(attention=True))
    assert sorted(first) == ["attention", "edit", "settings", "strip"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = write_edit(tmp_path, "dog", result, EditConfig(attention=False))
    assert {p.name for p in second.values()} == {"dog-2.png", "dog-2_strip.png", "dog-2.json"}
    assert not (tmp_path / "dog-2_attention.png").exists()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # the first edit intact
    third = write_edit(tmp_path, "dog", result, EditConfig(attention=False, overwrite=True))
    assert third["edit"].name == "dog.png"
    assert not (tmp_path / "dog_attention.png").exists()  # the earlier edit's map went with it
    assert json.loads((tmp_path / "dog.json").read_text())["files"] == {
        "edit": "dog.png",
        "strip": "dog_strip.png",
        "settings": "dog.json",
    }
    assert Image.open(third["edit"]).tobytes() == result.images[1].tobytes()
