"""Hostile input to ``nti invert``: names that would climb out of the output folder, land on the run's own files
or rewrite the console; checks that come before the model loads and leave nothing behind; runtime I/O errors
with their own exit code and their first cause (issue #27 items 1, 2, 10, 11, 13)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nti_lightning import faults
from nti_lightning.cli import main
from nti_lightning.exit_codes import EXIT_CONFIG_ERROR, EXIT_IO_ERROR, EXIT_OK, EXIT_SOME_FAILED
from nti_lightning.run import read_manifest

IDS = ["img0", "img1"]
FAST = ["inversion.num_ddim_steps=2", "inversion.num_inner_steps=1", "inversion.image_size=64",
        "inversion.batch_size=2", "output.compute_baseline=false", "trainer.accelerator=cpu"]  # fmt: skip
HOSTILE = ["...png", "..png", "config.yaml.png", "run.json.png", "progress.json.png", "manifest.x.jsonl.png",
           "logs.png", "images.png", "new\nline.png", "ansi\x1b[2J.png", "ok.png"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(path, format="PNG")


@pytest.fixture
def hostile(tmp_path):
    """``parent/data/`` with the hostile names and ``parent/out`` as the output; ``parent/meta.json`` and a
    ``.x.tmp`` file beside the output must survive."""
    data = tmp_path / "data"
    data.mkdir()
    for k, name in enumerate(HOSTILE):
        _image(data / name, k)
    (tmp_path / "meta.json").write_text("theirs")
    (tmp_path / ".keep.x.tmp").write_text("theirs")
    return data, tmp_path / "out"


def _args(data, out, model_dir, *extra):
    return ["invert", "--images", str(data), "--output", str(out), f"model.spec={model_dir}", "--quiet", *FAST,
            "data.default_prompt=a photo", *extra]  # fmt: skip


def test_hostile_names_stay_inside_and_off_the_runs_own_files(hostile, model_dir, capsys):
    data, out = hostile
    parent_before = sorted(p.name for p in out.parent.iterdir())
    assert main(_args(data, out, model_dir)) == EXIT_SOME_FAILED
    res = capsys.readouterr()
    # nothing outside the output folder moved
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([*parent_before, "out"])
    assert (out.parent / "meta.json").read_text() == "theirs" and (out.parent / ".keep.x.tmp").exists()
    recs = read_manifest(out)
    failed = {k for k, r in recs.items() if r["status"] != "ok"}
    assert failed == {"..", ".", "new\nline", "ansi\x1b[2J"}, failed  # refused per image, the run went on
    for k in ("..", "."):
        assert "rename the file" in recs[k]["error"]
    ok = {k for k, r in recs.items() if r["status"] == "ok"}
    assert ok == {"config.yaml", "run.json", "progress.json", "manifest.x.jsonl", "logs", "images", "ok"}
    for k in ok:  # every image's files in its own folder under images/
        assert all(p.startswith(f"images/{k}/") for p in recs[k]["paths"].values()), recs[k]["paths"]
        assert (out / recs[k]["paths"]["inversion"]).is_file()
    # the run's own files are its own
    assert json.loads((out / "run.json").read_text())["inversion"]["num_ddim_steps"] == 2
    assert "inversion:" in (out / "config.yaml").read_text()
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == ["manifest.jsonl"]
    # the console and the log show control characters escaped
    for text in (res.out, res.err, (out / "logs" / "rank0.log").read_text()):
        assert "\x1b" not in text
    assert "\\x1b" in res.out + res.err or "\\x1b" in (out / "logs" / "rank0.log").read_text()
    # a rerun and `nti status` work on this folder
    assert main(_args(data, out, model_dir)) == EXIT_SOME_FAILED
    assert "0 inverted, 0 failed, 11 already done" in capsys.readouterr().out
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr()
    assert "7 done, 4 failed" in printed.out and "\x1b" not in printed.out


def test_list_rows_that_climb_are_read_but_never_written_outside(tmp_path, model_dir):
    (tmp_path / "lists").mkdir()
    (tmp_path / "pics").mkdir()
    _image(tmp_path / "pics" / "x.png", 0)
    rows = [{"image": "../pics/x.png", "prompt": "a photo"}, {"image": "../../../../etc/passwd.png", "prompt": "p"}]
    (tmp_path / "lists" / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "lists" / "out"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["invert", "--images", str(tmp_path / "lists" / "l.jsonl"), "--output", str(out),
                 f"model.spec={model_dir}", "--quiet", *FAST]) == EXIT_SOME_FAILED  # fmt: skip
    recs = read_manifest(out)
    assert recs["pics__x"]["status"] == "ok" and recs["pics__x"]["paths"]["inversion"].startswith("images/")
    after = {str(p) for p in tmp_path.rglob("*")}
    assert {p for p in after - set(before) if not p.startswith(str(out))} == set()


def test_checks_come_before_the_model_loads_and_leave_nothing(noise_dataset, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert main(_args(tmp_path / "nonexistent", out, model_dir)) == EXIT_CONFIG_ERROR
    assert not out.exists()  # no run.json, config.yaml, lock or folder left behind
    assert main(_args(noise_dataset, out, model_dir)) == EXIT_OK  # the corrected rerun is not refused
    import nti_lightning.models as models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the folder's settings were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    assert main(_args(noise_dataset, out, model_dir, "inversion.guidance_scale=3.0")) == EXIT_CONFIG_ERROR
    assert json.loads((out / "run.json").read_text())["inversion"]["guidance_scale"] == 7.5  # untouched
    assert not list((out / "locks").glob("*.lock"))


def test_a_runtime_io_error_exits_74_with_its_first_cause_and_releases_the_claims(
    noise_dataset, model_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    monkeypatch.setenv("NTI_FAULT", "file.written:inversion.safetensors@1=oserror")
    faults.reload()
    try:
        assert main(_args(noise_dataset, out, model_dir)) == EXIT_IO_ERROR
    finally:
        monkeypatch.delenv("NTI_FAULT")
        faults.reload()
    err = capsys.readouterr().err
    assert "No space left on device" in err and "metrics.csv" not in err and len(err.strip().splitlines()) == 1
    assert not list((out / "locks").glob("*.lock"))  # released: the rerun is not refused
    assert not list((out / ".nti" / "tmp").rglob("*.tmp"))
    assert main(_args(noise_dataset, out, model_dir)) == EXIT_OK
    assert sorted(read_manifest(out)) == IDS
