"""`nti invert` end to end on a folder with good and bad files (random tiny model saved as a diffusers folder)."""

import json

import numpy as np
import pytest
from PIL import Image

from nti_lightning import load_inversion, load_model
from nti_lightning.cli import EXIT_SOME_FAILED, main
from nti_lightning.config import load_config

GOOD = {"good1.png": "a photo of a cat", "good2.jpg": "a red car", "gray.png": "a gray wall", "rgba.png": "a logo"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((70, 90, 3)) * 255).astype(np.uint8)).save(d / "good1.png")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(d / "good2.jpg")
    Image.new("L", (64, 64), 80).save(d / "gray.png")
    Image.new("RGBA", (64, 64), (10, 200, 10, 128)).save(d / "rgba.png")
    (d / "broken.png").write_bytes((d / "good1.png").read_bytes()[:120])
    (d / "notimage.jpg").write_text("not an image")
    Image.new("RGB", (12, 12)).save(d / "tiny.png")
    Image.new("RGB", (64, 64)).save(d / "nocap.png")
    Image.new("RGB", (64, 64)).save(d / "long.png")
    Image.new("RGB", (64, 64)).save(d / "empty.png")
    Image.new("RGB", (64, 64)).save(d / "dup.png")
    Image.new("RGB", (64, 64)).save(d / "dup.jpg")
    rows = [{"image": k, "prompt": v} for k, v in GOOD.items()]
    rows += [{"image": n, "prompt": "something"} for n in ("broken.png", "notimage.jpg", "tiny.png", "dup.png")]
    rows += [{"image": "long.png", "prompt": " ".join(["word"] * 90)}, {"image": "empty.png", "prompt": ""}]
    lines = [json.dumps(r) for r in rows] + ["{this is not json"]
    (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _run(dataset, out, model_dir, *extra):
    return main(
        ["invert", "--images", str(dataset), "--captions", str(dataset / "captions.jsonl"), "--output", str(out),
         f"model.spec={model_dir}", "inversion.num_ddim_steps=3", "inversion.num_inner_steps=2",
         "inversion.image_size=64", "inversion.batch_size=3", "--quiet", *extra]
    )  # fmt: skip


def _manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_local_folder_loads_through_load_model(model_dir, random_model):
    loaded = load_model(str(model_dir))
    assert loaded.fingerprint == random_model.fingerprint
    assert loaded.pipeline.unet is loaded.unet and loaded.native_image_size == random_model.native_image_size


def test_invert_folder_with_good_and_bad_files(dataset, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(dataset, out, model_dir) == EXIT_SOME_FAILED  # 4 inverted, 8 failed: exit 3, not 0
    printed = capsys.readouterr().out
    assert "4 inverted" in printed and "8 failed" in printed
    records = {r["id"]: r for r in _manifest(out)}
    assert len(records) == 12 == len(_manifest(out))  # every file once, none twice
    assert {k for k, r in records.items() if r["status"] == "ok"} == {"good1", "good2", "gray", "rgba"}
    errors = {k: r["error"] for k, r in records.items() if r["status"] != "ok"}
    assert "truncated" in errors["broken"] and "broken.png" in errors["broken"]
    assert "not an image" in errors["notimage"]
    assert "too small" in errors["tiny"]
    assert "missing caption" in errors["nocap"]
    assert "limit of 77" in errors["long"]
    assert "empty prompt" in errors["empty"]
    assert "duplicate image id 'dup'" in errors["dup.png"] and "missing caption" in errors["dup"]
    for k in ("good1", "good2", "gray", "rgba"):
        rec = records[k]
        for p in rec["paths"].values():
            assert (out / p).is_file()
        strip = Image.open(out / rec["paths"]["strip"])
        width, height = strip.size  # input | VAE round trip | no NTI | NTI, under a band of column labels
        assert width == 4 * 64 + 3 * 4 and 64 + 8 <= height <= 64 + 48
        m = rec["metrics"]
        assert {"nti", "ddim_no_nti", "vae_roundtrip_vs_input"} <= set(m)
        assert np.isfinite(m["nti"]["vs_vae"]["psnr"]) and -1 <= m["nti"]["vs_input"]["ssim"] <= 1
        inv = load_inversion(out / rec["paths"]["inversion"], model=load_model(str(model_dir)))
        assert inv.null_embeddings.shape[0] == 3 and inv.meta["image"]["id"] == k
        meta = json.loads((out / rec["paths"]["meta"]).read_text())
        assert meta["prompt"] == GOOD[rec["source"].split("/")[-1]]
    cfg = load_config(out / "config.yaml")
    assert cfg.inversion.num_ddim_steps == 3 and cfg.model.spec == str(model_dir)
    # precision "auto" (the default) is recorded as the mode that ran: fp32 on this CPU
    assert cfg.trainer.precision == "32-true" and json.loads((out / "run.json").read_text())["precision"] == "32-true"
    assert not list(out.rglob("*.tmp"))

    # a rerun skips everything already recorded; the folder still holds failures: exit 3
    assert _run(dataset, out, model_dir) == EXIT_SOME_FAILED
    assert "0 inverted, 0 failed, 12 already done" in capsys.readouterr().out
    assert len(_manifest(out)) == 12
    # --retry-failed re-attempts only the failures
    assert _run(dataset, out, model_dir, "--retry-failed") == EXIT_SOME_FAILED
    assert "0 inverted, 8 failed, 4 already done" in capsys.readouterr().out

    # other hyperparameters into the same folder: refused, nothing written
    assert _run(dataset, out, model_dir, "inversion.guidance_scale=5.0") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "inversion.guidance_scale: 7.5 there, 5.0 now" in err
    assert len(_manifest(out)) == 20

    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert "4 done, 8 failed" in status and "failed broken" in status
    # an image recorded "ok" whose inversion file is gone is inverted again, and only that one
    ok_rec = next(r for r in _manifest(out) if r["status"] == "ok")
    (out / ok_rec["paths"]["inversion"]).unlink()
    assert _run(dataset, out, model_dir) == EXIT_SOME_FAILED
    assert "1 inverted, 0 failed, 11 already done" in capsys.readouterr().out
    assert (out / ok_rec["paths"]["inversion"]).is_file()


def test_unknown_override_is_an_error(capsys, tmp_path):
    assert main(["invert", "--output", str(tmp_path), "inversion.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
