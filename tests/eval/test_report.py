"""Evaluation outputs: every worker's records read back, summary table, plot, strips."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
from PIL import Image

from nti_lightning.eval.report import (
    PER_IMAGE,
    finished,
    image_strip,
    markdown_table,
    pair_id,
    read_records,
    summarize,
    write_summary,
)
from nti_lightning.run.folder import RunFolder, WorkerId
from nti_lightning.store.records import OK


def _records():
    return [
        {"id": "a", "method": "nti", "psnr_bg": 20.0, "seconds": 10.0, "unet_calls": 550, "ssim_bg": 0.8},
        {"id": "b", "method": "nti", "psnr_bg": 30.0, "seconds": 12.0, "unet_calls": 550, "ssim_bg": float("nan")},
        {"id": "a", "method": "npi", "psnr_bg": 18.0, "seconds": 2.0, "unet_calls": 100, "structure_distance": 0.02},
    ]


def _append(out, worker: WorkerId, records, t0=1.0):
    log = RunFolder(out, worker).records(lambda line: None)
    for k, r in enumerate(records):
        rec = {**r, "image_id": r["id"], "id": pair_id(r["id"], r["method"]), "status": "ok", "finished_at": t0 + k}
        log.append(rec, OK)


def test_records_of_every_worker_are_read_back_latest_first_and_torn_lines_skipped(tmp_path):
    _append(tmp_path, WorkerId(0, 2), _records()[:2])
    _append(tmp_path, WorkerId(1, 2), _records()[2:])
    with open(tmp_path / "manifest.shard1.rank0.jsonl", "a") as f:
        f.write('{"id": "c/nti", "method": "nti", "psnr')  # a kill mid-line
    _append(tmp_path, WorkerId(0, 2), [{**_records()[0], "psnr_bg": 21.0}], t0=10.0)  # redone later: it wins
    assert finished(tmp_path) == {("a", "nti"), ("b", "nti"), ("a", "npi")}
    recs = read_records(tmp_path)
    assert [(r["image_id"], r["method"]) for r in recs] == [("a", "npi"), ("b", "nti"), ("a", "nti")]  # finish order
    assert recs[2]["psnr_bg"] == 21.0
    assert math.isnan(recs[1]["ssim_bg"])  # stored as strict JSON (null + ssim_bg_nonfinite), NaN again here


def test_summary_means_ignore_nan_and_last_record_wins():
    recs = _records() + [{"id": "a", "method": "npi", "psnr_bg": 22.0, "seconds": 2.0, "unet_calls": 100}]
    s = summarize(recs)
    assert s["nti"]["psnr_bg"] == 25.0 and s["nti"]["ssim_bg"] == 0.8 and s["nti"]["unet_calls"] == 550
    assert s["npi"]["psnr_bg"] == 22.0 and "structure_distance" not in s["npi"]


def test_markdown_table_has_pie_columns_and_dashes():
    table = markdown_table(summarize(_records()))
    head = table.splitlines()[0]
    for col in (
        "Method",
        "Structure Distance",
        "Background PSNR",
        "LPIPS",
        "MSE",
        "SSIM",
        "CLIP Whole",
        "CLIP Edited",
        "s/image",
        "UNet calls/image",
    ):
        assert col in head
    nti = next(line for line in table.splitlines() if line.startswith("| nti "))
    assert "25.00" in nti and "80.00" in nti and "| 550 |" in nti and "—" in nti
    npi = next(line for line in table.splitlines() if line.startswith("| npi "))
    assert "| 20.00 |" in npi  # structure distance ×10³


def test_write_summary_files(tmp_path):
    _append(tmp_path, WorkerId(), _records())
    s = write_summary(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == s
    assert "Images per method: nti 2, npi 1" in (tmp_path / "summary.md").read_text()
    per_image = [json.loads(x) for x in (tmp_path / PER_IMAGE).read_text().splitlines()]
    assert [r["id"] for r in per_image] == ["a/nti", "b/nti", "a/npi"]
    assert list(write_summary(tmp_path, methods=["npi", "ddim"])) == ["npi", "nti"]  # the order asked for first
    if importlib.util.find_spec("matplotlib") is not None:  # matplotlib is optional: no plot without it
        assert Image.open(tmp_path / "psnr_vs_time.png").size[0] > 100
    else:
        assert not (tmp_path / "psnr_vs_time.png").exists()


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    from nti_lightning.eval.report import plot_psnr_vs_time

    with caplog.at_level("INFO"):
        assert plot_psnr_vs_time(summarize(_records()), tmp_path / "p.png") is False
    assert not (tmp_path / "p.png").exists() and len(caplog.records) == 1


def test_image_strip(tmp_path):
    src = np.zeros((64, 64, 3), np.uint8)
    recon = np.ones((3, 32, 32), np.float32) * 0.5
    edit = Image.new("RGB", (80, 80), "red")
    strip = image_strip(src, {"nti": (recon, edit), "npi": (None, edit)}, tmp_path / "s.png", size=64)
    assert strip.size == (4 * 64 + 3 * 4, 64 + 16)
    assert Image.open(tmp_path / "s.png").size == strip.size
    px = np.asarray(strip)
    assert (px[16:, 3 * 68 + 10] == [255, 0, 0]).all()  # the last tile is the red edit
    assert px[:16].min() < 255  # labels were drawn
