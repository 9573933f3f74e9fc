"""``bench.authors_code``: running the authors' ``NullInversion`` from a checkout. Their code is not in this repository,
so a stand-in checkout is written here with the same layout (a notebook cell defining ``NullInversion`` and a
``ptp_utils.py`` with ``register_attention_control``): the harness must find the cell, give it the notebook's
globals, hook a copy of the UNet (ours untouched) and refuse a hook that misses the attention modules."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from nti_bench.authors_code import AuthorsNullInversion, null_inversion_source
from nti_lightning.models.attention_dispatch import _direct_forward

CELL = """
def load_512(image_path, left=0, right=0, top=0, bottom=0):
    raise AssertionError("the harness replaces load_512")


class NullInversion:
    def invert(self, image_path, prompt, offsets=(0, 0, 0, 0), num_inner_steps=10, early_stop_epsilon=1e-5):
        ptp_utils.register_attention_control(self.model, None)
        image = load_512(image_path, *offsets)
        x = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 127.5 - 1
        latent = self.model.vae.encode(x.to(device))["latent_dist"].mean * 0.18215
        print("step_i", 0)
        nulls = [torch.full((1, 77, 32), float(num_inner_steps))] * NUM_DDIM_STEPS
        return (image, None), latent, nulls

    def __init__(self, model):
        self.model = model

null_inversion = NullInversion(ldm_stable)
"""

HOOK = """
import cv2  # the real one imports OpenCV and IPython for figures
from IPython.display import display


def register_attention_control(model, controller):
    for module in model.unet.modules():
        if type(module).__name__ == "Attention" and {hooks}:
            module.forward = lambda *args, _f=module.forward, **kwargs: _f(*args, **kwargs)
"""


def _checkout(path, hooks: str = "True"):
    path.mkdir()
    cells = [{"cell_type": "markdown", "source": ["# NTI"]}, {"cell_type": "code", "source": CELL.splitlines(True)}]
    (path / "null_text_w_ptp.ipynb").write_text(json.dumps({"cells": cells}))
    (path / "ptp_utils.py").write_text(HOOK.format(hooks=hooks))
    return path


def test_runs_the_checkout_s_class_on_a_copy_of_the_unet(tmp_path, tiny_model):
    assert "NullInversion(ldm_stable)" not in null_inversion_source(_checkout(tmp_path / "repo"))
    runner = AuthorsNullInversion(tmp_path / "repo", tiny_model, num_ddim_steps=3, guidance_scale=7.5,
                                  num_inner_steps=4, early_stop_epsilon=1e-5)  # fmt: skip
    pixels = torch.rand(3, 64, 64) * 2 - 1
    z_T, nulls = runner.invert(pixels, "a photo of a cat")
    assert z_T.shape == (4, 16, 16) and len(nulls) == 3 and float(nulls[0][0, 0, 0]) == 4.0
    hooked = [m for m in runner.unet.modules() if "forward" in m.__dict__]
    assert hooked and all(type(m).__name__ == "Attention" for m in hooked)
    assert not any("_nti_direct_dispatch" in m.__dict__ for m in runner.unet.modules())  # diffusers' forward, hooked
    ours = [m for m in tiny_model.unet.modules() if "forward" in m.__dict__]
    assert ours and all(m.forward.__func__ is _direct_forward for m in ours)  # ours untouched by their hook
    assert all(p.requires_grad for p in runner.unet.parameters())  # as distributed
    assert not any(p.requires_grad for p in tiny_model.unet.parameters())
    for name in ("cv2", "IPython"):  # where not installed, the stand-ins are gone after ptp_utils' import
        assert name not in sys.modules or sys.modules[name].__spec__ is not None


def test_refuses_a_hook_that_misses_the_attention_modules(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="hooked 0 of"):
        AuthorsNullInversion(_checkout(tmp_path / "repo", hooks="False"), tiny_model, 3, 7.5, 4, 1e-5)


def test_missing_files_are_named(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="null_text_w_ptp.ipynb is missing"):
        AuthorsNullInversion(tmp_path, tiny_model, 3, 7.5, 4, 1e-5)
