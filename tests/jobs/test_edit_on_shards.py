"""``nti edit OUTPUT --edits`` over a run in the shards layout: an ``image_id`` is found among the run's records
through ``nti.open_run`` (no per-image file exists), the edit lands in the edit job's folder."""

from __future__ import annotations

import json

import pytest

from nti_lightning.cli import main

IDS = ["img0", "img1"]
FAST = ["inversion.num_ddim_steps=2", "inversion.num_inner_steps=1", "inversion.image_size=64",
        "output.compute_baseline=false", "trainer.accelerator=cpu", "--quiet"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def test_edits_of_a_shards_layout_run(noise_dataset, model_dir, tmp_path):
    out = tmp_path / "out"
    inv = ["invert", "--images", str(noise_dataset), "--captions", str(noise_dataset / "captions.jsonl"),
           "--output", str(out), f"model.spec={model_dir}", "output.layout=shards", *FAST]  # fmt: skip
    assert main(inv) == 0
    assert list((out / "shards").glob("*.tar")) or list((out / "shards").glob("*.part"))
    assert not (out / "images").exists()
    edits = tmp_path / "edits.jsonl"
    rows = [{"image_id": "img1", "target": "a photo of thing 9"}, {"image_id": "img7", "target": "x"},
            {"image_id": "../../img1", "target": "y"}]  # fmt: skip
    edits.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["edit", str(out), "--edits", str(edits), "trainer.accelerator=cpu", "--quiet"]) == 3
    res = {r["line"]: r for r in map(json.loads, (out / "edits" / "results.jsonl").read_text().splitlines())}
    assert res[1]["status"] == "ok" and (out / res[1]["paths"]["edit"]).is_file()
    assert res[1]["paths"]["edit"].startswith("edits/images/img1/")
    assert res[2]["status"] == "failed" and "not among the images" in res[2]["error"]
    assert res[3]["status"] == "failed"
    settings = json.loads((out / res[1]["paths"]["settings"]).read_text())
    assert settings["inversion"].startswith(str(out / "shards")) and "@" in settings["inversion"]
