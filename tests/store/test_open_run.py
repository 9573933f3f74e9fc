"""`nti.open_run` on the folders layout and on folders of older runs (records at ``OUTPUT/<id>/`` or
``OUTPUT/ab/<id>/``, no index): every inversion back, by id and in order, as a torch Dataset."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

import nti_lightning as nti
from nti_lightning.cli import main
from nti_lightning.run import read_manifest
from nti_lightning.store.inversion import load_inversion

IDS = ["img0", "img1", "img2"]
FAST = ["inversion.num_ddim_steps=2", "inversion.num_inner_steps=1", "inversion.image_size=64",
        "inversion.batch_size=1", "output.compute_baseline=false", "output.save_strip=false",
        "trainer.accelerator=cpu", "--quiet"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders_run(noise_dataset, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    args = ["invert", "--images", str(noise_dataset), "--captions", str(noise_dataset / "captions.jsonl"),
            "--output", str(out), f"model.spec={model_dir}", "output.layout=folders", *FAST]  # fmt: skip
    assert main(args) == 0
    return out


def _by_manifest(out) -> dict[str, torch.Tensor]:
    return {k: load_inversion(out / r["paths"]["inversion"]).null_embeddings for k, r in read_manifest(out).items()}


def test_open_run_reads_the_folders_layout(folders_run):
    run = nti.open_run(folders_run)
    want = _by_manifest(folders_run)
    assert len(run) == 3 and list(run) == IDS and set(run.keys()) == set(IDS)
    for k, inv in run.items():
        assert torch.equal(inv.null_embeddings, want[k])
    assert run.locate("img1").endswith("images/img1/inversion.safetensors")
    with pytest.raises(KeyError):
        run["img9"]
    ds = run.as_dataset()
    assert len(ds) == 3 and ds[2]["id"] == "img2" and torch.equal(ds[-1]["null_embeddings"], want["img2"])


@pytest.mark.parametrize("subdirs", [False, True])
def test_open_run_reads_a_folder_from_before_the_index(folders_run, tmp_path, subdirs):
    """The oldest layout: ``OUTPUT/<id>/inversion.safetensors`` (or ``OUTPUT/ab/<id>/``), manifests only."""
    old = tmp_path / "old"
    old.mkdir()
    lines = []
    for rec in read_manifest(folders_run).values():
        rel = rec["id"] if not subdirs else f"{hashlib.sha1(rec['id'].encode()).hexdigest()[:2]}/{rec['id']}"
        shutil.copytree(folders_run / "images" / rec["id"], old / rel)
        rec["paths"] = {"inversion": f"{rel}/inversion.safetensors", "meta": f"{rel}/meta.json"}
        lines.append(json.dumps(rec))
    (old / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    run = nti.open_run(old)
    want = _by_manifest(folders_run)
    assert list(run) == IDS and all(torch.equal(run[k].null_embeddings, want[k]) for k in IDS)
    assert [k for k, _ in run.items()] == IDS
    assert not (old / ".nti").exists()  # read in memory, nothing written


def test_open_run_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not the output folder"):
        nti.open_run(tmp_path)
