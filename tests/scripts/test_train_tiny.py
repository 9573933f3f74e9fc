"""``scripts/train_tiny.py``, the one trainer of the embedded models (issue #15), run end to end in its ``--quick``
mode: the sd1 folder (tokenizer, VAE, UNet), then sd2 and sdxl UNets on that VAE; each folder loads with
``load_model`` as the family it was trained for; the same seed gives the same bytes, another seed other weights.
Marked slow (four trainer runs, ~1 minute): CI runs it with ``pytest -m slow``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nti_lightning.models.loading import load_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors")


def _train(out: Path, *args: str) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "train_tiny.py"), "--quick", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_tiny")
    _train(root / "sd1")
    _train(root / "sd1_again")
    _train(root / "sd1_seed1", "--seed", "1")
    for family in ("sd2", "sdxl"):
        _train(root / family, "--family", family, "--base", str(root / "sd1"))
    return root


def test_sd1_folder_loads_as_sd1_and_is_deterministic(trained):
    model = load_model(trained / "sd1")
    assert model.family.name == "sd1" and model.scaling_factor == pytest.approx(0.18215)
    for name in WEIGHTS:
        assert (trained / "sd1" / name).read_bytes() == (trained / "sd1_again" / name).read_bytes(), name
        a, b = load_file(trained / "sd1" / name), load_file(trained / "sd1_seed1" / name)
        assert any(not torch.equal(a[k], b[k]) for k in a), f"{name}: seed 1 gave seed 0's weights"


@pytest.mark.parametrize("family, name, scaling", [("sd2", "sd2-v", 0.18215), ("sdxl", "sdxl", 0.13025)])
def test_other_families_train_on_the_sd1_vae(trained, family, name, scaling):
    base, model = load_model(trained / "sd1"), load_model(trained / family)
    assert model.family.name == name and model.scaling_factor == pytest.approx(scaling)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():  # the same scaled latents: one VAE (refolded to SDXL's scaling_factor)
        z_base = base.vae.encode(x).latent_dist.mean * base.scaling_factor
        z = model.vae.encode(x).latent_dist.mean * model.scaling_factor
    torch.testing.assert_close(z, z_base, rtol=1e-3, atol=1e-3)
