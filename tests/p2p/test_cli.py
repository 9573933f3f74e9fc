"""``nti edit`` (``p2p.cli``) on the random tiny model: the single and the batch form, the files each edit
writes (labelled strip, settings JSON), reruns that never overwrite, the command line as every line's default."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from nti_lightning.edit_config import EDIT_DEFAULTS
from nti_lightning.p2p import cli
from nti_lightning.store.inversion import save_inversion

from .helpers import DOG, SOURCE, make_inversion
from .test_edit_args import parse

STEM = "a_dog_sitting_next_to_a_mirror"


@pytest.fixture
def folder(model, tmp_path, monkeypatch):
    """An `nti invert`-like output folder with two inversions; `nti edit` gets the random model."""
    monkeypatch.setattr(cli, "load_model_for", lambda inv, spec, device, config_dir=None: model)
    for image_id, prompt, seed in (("cat", SOURCE, 0), ("car", "a red car on a road", 1)):
        save_inversion(tmp_path / image_id / "inversion.safetensors", make_inversion(model, prompt, seed=seed))
    return tmp_path


def edit_cat(folder, *extra) -> int:
    return cli.run_edit(parse(["edit", str(folder / "cat" / "inversion.safetensors"), "--target", DOG, *extra]))


def run_batch(folder, lines, *extra) -> list[dict]:
    edits_file = folder / "edits.jsonl"
    edits_file.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    assert cli.run_edit(parse(["edit", str(folder), "--edits", str(edits_file), *extra])) == 0
    return [json.loads(x) for x in (folder / "edit_results.jsonl").read_text().splitlines()]


def test_cli_single_and_batch(folder):
    assert edit_cat(folder, "--blend", "cat", "dog", "--cross-replace", "0.6", "dog=0.3", "--attention") == 0
    edits = folder / "cat" / "edits"
    strip = Image.open(edits / f"{STEM}_strip.png")
    assert strip.width == 3 * 64 + 2 * 4 and strip.height > 64  # input | reconstruction | edit, under labels
    edit = Image.open(edits / f"{STEM}.png")
    band = strip.height - 64
    assert strip.crop((2 * 68, band, 2 * 68 + 64, band + 64)).tobytes() == edit.tobytes()
    assert (edits / f"{STEM}_attention.png").is_file()

    lines = [
        {"image_id": "cat", "target": DOG, "blend": ["cat", "dog"]},
        {"image_id": "cat", "target": "a cat sitting next to a silver mirror", "mode": "refine"},
        {"image_id": "cat", "target": SOURCE, "reweight": {"cat": 2}},
        {"image_id": "cat", "target": DOG, "blend": ["horse"]},  # word not there
        {"image_id": "car", "target": "a blue car on a road", "cross_replace": {"default": 0.8, "blue": 0.2}},
        {"image_id": "car", "target": "a car", "mode": "replace"},  # cannot be aligned
        {"image_id": "nope", "target": "a dog"},  # no such image
        {"image_id": "car", "target": "a blue car", "colour": 1},  # unknown field
        "{not json",
        {"image_id": "car", "target": "a blue car", "mode": "swap"},  # no such mode
    ]
    results = run_batch(folder, lines, "--batch-size", "2")
    status = {r["line"]: r["status"] for r in results}
    assert status == {1: "ok", 2: "ok", 3: "ok", 4: "failed", 5: "ok", 6: "failed", 7: "failed", 8: "failed",
                      9: "failed", 10: "failed"}  # fmt: skip
    by_line = {r["line"]: r for r in results}
    assert by_line[1]["mode"] == "replace" and by_line[2]["mode"] == "refine" and by_line[3]["mode"] == "reweight"
    assert "horse" in by_line[4]["error"] and "same number of words" in by_line[6]["error"]
    assert "no inversion at" in by_line[7]["error"]
    assert "unknown field" in by_line[8]["error"] and "JSON" in by_line[9]["error"]
    assert "unknown edit mode 'swap'" in by_line[10]["error"]
    for line in (1, 2, 3, 5):
        paths = by_line[line]["paths"]
        assert sorted(paths) == ["edit", "settings", "strip"]  # no --attention: no attention map
        assert paths["edit"].startswith(f"{by_line[line]['image_id']}/edits/{line:04d}_")
        for path in paths.values():
            assert (folder / path).is_file()


def test_each_edit_saves_its_resolved_settings(folder):
    assert edit_cat(folder, "--cross-replace", "dog=0.3", "--attention") == 0
    record = json.loads((folder / "cat" / "edits" / f"{STEM}.json").read_text())
    assert record["source_prompt"] == SOURCE and record["target"] == DOG
    assert record["inversion"] == str((folder / "cat" / "inversion.safetensors").resolve())
    assert record["config"] == {
        **EDIT_DEFAULTS.to_dict(),
        "mode": "replace",  # inferred
        "guidance_scale": 7.5,  # the inversion's
        "cross_replace": {"default_": EDIT_DEFAULTS.cross_replace, "dog": 0.3},
        "attention": True,
    }
    assert record["files"] == {
        "edit": f"{STEM}.png",
        "strip": f"{STEM}_strip.png",
        "attention": f"{STEM}_attention.png",
        "settings": f"{STEM}.json",
    }


def test_reruns_never_overwrite_or_leave_a_stale_attention_map(folder):
    edits = folder / "cat" / "edits"
    assert edit_cat(folder, "--attention") == 0
    first = {p.name: p.read_bytes() for p in edits.iterdir()}
    assert edit_cat(folder, "--self-replace", "0.0") == 0  # another edit, same name, no attention map
    assert {p.name: p.read_bytes() for p in edits.iterdir() if p.name in first} == first
    assert sorted(set(p.name for p in edits.iterdir()) - set(first)) == [
        f"{STEM}-2.json",
        f"{STEM}-2.png",
        f"{STEM}-2_strip.png",
    ]
    assert json.loads((edits / f"{STEM}-2.json").read_text())["config"]["self_replace"] == 0.0
    second = (edits / f"{STEM}-2.png").read_bytes()
    assert second != first[f"{STEM}.png"]  # the settings differ, so do the pictures
    assert edit_cat(folder, "--self-replace", "0.0", "--overwrite") == 0  # replaces the first edit, all of it
    assert not (edits / f"{STEM}_attention.png").exists()
    assert (edits / f"{STEM}.png").read_bytes() == second  # the new edit under the first one's name
    assert json.loads((edits / f"{STEM}.json").read_text())["config"]["overwrite"] is True
    assert (edits / f"{STEM}-2.png").read_bytes() == second  # the other edit untouched


def test_batch_rerun_numbers_its_edits(folder):
    line = {"image_id": "cat", "target": DOG}
    first = run_batch(folder, [line], "--attention")
    second = run_batch(folder, [line])
    assert first[0]["paths"]["edit"] == f"cat/edits/0001_{STEM}.png"
    assert second[0]["paths"] == {
        "edit": f"cat/edits/0001_{STEM}-2.png",
        "strip": f"cat/edits/0001_{STEM}-2_strip.png",
        "settings": f"cat/edits/0001_{STEM}-2.json",
    }
    assert (folder / first[0]["paths"]["attention"]).is_file()


def test_command_line_settings_are_every_line_s_defaults(folder):
    lines = [
        {"image_id": "cat", "target": DOG},
        {"image_id": "cat", "target": DOG, "cross_replace": 0.25, "self_replace": [0.0, 0.5], "guidance_scale": 3},
    ]
    results = run_batch(folder, lines, "--cross-replace", "0.5", "--self-replace", "0.25", "--guidance-scale", "5")
    configs = [json.loads((folder / r["paths"]["settings"]).read_text())["config"] for r in results]
    assert [(c["cross_replace"], c["self_replace"], c["guidance_scale"]) for c in configs] == [
        (0.5, 0.25, 5.0),
        (0.25, [0.0, 0.5], 3.0),
    ]


def test_batch_form_refuses_per_edit_options(folder, capsys):
    (folder / "edits.jsonl").write_text(json.dumps({"image_id": "cat", "target": DOG}) + "\n")
    args = parse(["edit", str(folder), "--edits", str(folder / "edits.jsonl"), "--blend", "cat"])
    assert cli.run_edit(args) == cli.EXIT_USAGE_ERROR
    assert '"blend" / "reweight" per line' in capsys.readouterr().err
    assert not (folder / "edit_results.jsonl").exists()
