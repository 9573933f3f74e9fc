"""LPIPS through torchmetrics' public ``LearnedPerceptualImagePatchSimilarity``, its SqueezeNet backbone read from a
local file and never downloaded. torchvision cannot be installed beside this torch, so a subprocess runs with a
stand-in torchvision (``fake_torchvision/``: squeezenet1_1 and a weights enum that fetches through
``torch.hub.load_state_dict_from_url``, as torchvision's do) and with torch hub's download replaced by an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

SCRIPT = r"""
import json, os, sys, torch
import torch.hub
def no_download(*a, **k):
    raise AssertionError(f"download attempted: {a}")
torch.hub.download_url_to_file = no_download
import torchvision
from torchmetrics.functional.image.lpips import learned_perceptual_image_patch_similarity
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
from nti_lightning.eval.metrics import Backbones, hub_cache_holding, load_lpips, lpips

tmp = sys.argv[1]
torch.manual_seed(1)
saved = torchvision.models.squeezenet1_1().state_dict()
torch.save(saved, f"{tmp}/squeezenet.pth")
hub_before = torch.hub.get_dir()
net = load_lpips(Backbones(lpips=f"{tmp}/squeezenet.pth"))
out = {"class": type(net).__name__, "hub_restored": torch.hub.get_dir() == hub_before}
loaded = net.net.net.state_dict()  # the metric's LPIPS network's backbone slices (torchvision's feature indices)
out["backbone_is_the_file"] = all(torch.equal(v, saved["features." + k.split(".", 2)[2]]) for k, v in loaded.items())
out["backbone_tensors"] = len(loaded)
g = torch.Generator().manual_seed(0)
x, y = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
same, diff = lpips(x, x, net), lpips(x, y, net)
out["same"], out["diff"] = same.tolist(), diff.tolist()
keep = torch.zeros(64, 64); keep[:, :32] = 1
out["masked"] = lpips(x, y, net, keep).tolist()
with open(f"{tmp}/squeezenet.pth", "rb") as f:
    with hub_cache_holding(f.read(), "squeezenet1_1-b8a52dc0.pth"):
        ref = learned_perceptual_image_patch_similarity(x * 2 - 1, y * 2 - 1, net_type="squeeze", reduction="none")
        metric = LearnedPerceptualImagePatchSimilarity("squeeze", reduction="none", normalize=True)
        ref_masked = metric(x * keep, y * keep)
out["functional"], out["functional_masked"] = ref.tolist(), ref_masked.tolist()
torch.save({"conv.weight": torch.zeros(1)}, f"{tmp}/wrong.pth")
class RunsCode:
    def __reduce__(self):
        return (os.mkdir, (f"{tmp}/code_ran",))
torch.save({"features.0.weight": RunsCode()}, f"{tmp}/unsafe.pth")
for name in ("wrong", "unsafe"):
    try:
        load_lpips(Backbones(lpips=f"{tmp}/{name}.pth"))
        out[name] = "loaded"
    except ValueError as e:
        out[name] = str(e)
out["code_ran"] = os.path.exists(f"{tmp}/code_ran")
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lpips")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE / "fake_torchvision"), str(ROOT)]),
           "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp / "torch_home")}  # fmt: skip
    cmd = [sys.executable, "-c", SCRIPT, str(tmp)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_public_class_with_the_local_backbone_never_downloads(result):
    assert result["class"] == "LearnedPerceptualImagePatchSimilarity" and result["hub_restored"]
    assert result["backbone_is_the_file"] and result["backbone_tensors"] == 50  # the first conv (2) + 8 Fire blocks x 6


def test_per_image_values_match_torchmetrics_functional(result):
    assert result["same"] == [0.0, 0.0]
    assert all(v > 0 for v in result["diff"])
    assert result["diff"] == pytest.approx(result["functional"], abs=1e-6)
    assert result["masked"] == pytest.approx(result["functional_masked"], abs=1e-6)


def test_a_wrong_or_unsafe_file_is_one_clear_error(result):
    assert "wrong.pth: not a torchvision squeeze state dict" in result["wrong"]
    assert "unsafe.pth: not a torchvision squeeze state dict" in result["unsafe"] and "refused" in result["unsafe"]
    assert not result["code_ran"]
