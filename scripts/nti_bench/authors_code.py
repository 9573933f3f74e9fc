"""The authors' own Null-text Inversion code, run from a checkout of their repository, for the benchmark.

``bench.baseline`` re-implements the authors' loop; this module runs *their* code instead: the ``NullInversion``
class of ``null_text_w_ptp.ipynb`` (Mokady et al. 2023, github.com/google/prompt-to-prompt) and the
``register_attention_control`` of the ``ptp_utils.py`` beside it, both read from a folder the user supplies.
Nothing of theirs is copied into this package. What the harness supplies is what their notebook's other cells
do: the globals ``NUM_DDIM_STEPS``, ``GUIDANCE_SCALE``, ``device`` and ``ldm_stable`` (a ``StableDiffusionPipeline``
on the model's own components, with a fresh UNet copy whose weights require grad as ``from_pretrained`` leaves
them, so that their attention hook and weight gradients touch nothing of ours), and ``load_512`` at the model's
native size instead of 512 px (the tiny model's is 128 px; their function also centre-crops and resizes with
Pillow's default).

The official ``ptp_utils.py`` hooks ``CrossAttention`` modules with the diffusers ≤ 0.10 call signature; the
diffusers installed here names them ``Attention``, so use a checkout whose ``register_attention_control`` fits the
installed diffusers (the hook must change attention modules, or ``load_authors_null_inversion`` refuses it).
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import sys
import types
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from nti_lightning.models.attention_dispatch import remove_direct_dispatch

NOTEBOOK = "null_text_w_ptp.ipynb"
UTILS = "ptp_utils.py"


@contextmanager
def _display_modules_stubbed():
    """``ptp_utils`` imports OpenCV and IPython at the top for its figure helpers, which the inversion never
    calls; where those packages are not installed, stand-ins let it import (and are removed afterwards, so that
    nothing else, e.g. matplotlib, mistakes them for the real ones)."""
    added = []
    for name in ("cv2", "IPython"):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
            if name == "IPython":
                display = types.ModuleType("IPython.display")
                display.display = lambda *a, **k: None
                sys.modules["IPython.display"] = sys.modules["IPython"].display = display
                added.append("IPython.display")
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _load_ptp_utils(repo: Path):
    spec = importlib.util.spec_from_file_location("authors_ptp_utils", repo / UTILS)
    module = importlib.util.module_from_spec(spec)
    with _display_modules_stubbed():
        spec.loader.exec_module(module)
    return module


def null_inversion_source(repo: Path) -> str:
    """The notebook cell that defines ``class NullInversion``, without the line that instantiates it."""
    path = repo / NOTEBOOK
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    sources = ["".join(c["source"]) for c in cells if c.get("cell_type") == "code"]
    found = [s for s in sources if "class NullInversion" in s]
    if not found:
        raise ValueError(f"{path} has no code cell defining class NullInversion")
    return "\n".join(line for line in found[0].splitlines() if "= NullInversion(" not in line)


def _no_progress_bar(*args, **kwargs):
    class _Bar:
        def update(self, *a):
            pass

        def close(self):
            pass

    return _Bar()


class AuthorsNullInversion:
    """The authors' ``NullInversion`` bound to ``model``'s components; ``invert(pixels, prompt)`` runs their
    ``invert`` on one image and returns (z_T (4, h, w), [∅_t (1, 77, D)] × T)."""

    def __init__(self, repo: str | Path, model, num_ddim_steps: int, guidance_scale: float, num_inner_steps: int,
                 early_stop_epsilon: float) -> None:  # fmt: skip
        from diffusers import StableDiffusionPipeline
        from torch.optim.adam import Adam

        repo = Path(repo)
        for name in (NOTEBOOK, UTILS):
            if not (repo / name).is_file():
                raise FileNotFoundError(f"{repo / name} is missing: --authors-repo takes a prompt-to-prompt checkout")
        if model.family.name != "sd1":
            raise ValueError(f"the authors' NullInversion is written for SD1.x; this model is {model.family.name}")
        self.size = model.native_image_size
        self.num_inner_steps, self.early_stop_epsilon = num_inner_steps, early_stop_epsilon
        self.unet = copy.deepcopy(model.unet).requires_grad_(True)  # as from_pretrained leaves it
        remove_direct_dispatch(self.unet)  # diffusers' own Attention.forward, as from_pretrained leaves it
        self.pipe = StableDiffusionPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            unet=self.unet,
            scheduler=copy.deepcopy(model.scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.ptp_utils = _load_ptp_utils(repo)
        namespace = {
            "torch": torch, "np": np, "nnf": torch.nn.functional, "Adam": Adam, "Image": Image,
            "tqdm": _no_progress_bar, "ptp_utils": self.ptp_utils, "NUM_DDIM_STEPS": num_ddim_steps,
            "GUIDANCE_SCALE": guidance_scale, "device": model.device, "ldm_stable": self.pipe,
        }  # fmt: skip
        exec("from typing import Optional, Union, Tuple, List, Callable, Dict", namespace)  # their cell's typing
        exec("from diffusers import DDIMScheduler", namespace)
        exec(compile(null_inversion_source(repo), str(repo / NOTEBOOK), "exec"), namespace)
        namespace["load_512"] = self._load  # their load_512, at the model's size
        self.null_inversion = namespace["NullInversion"](self.pipe)
        self._check_hook()

    def _load(self, image, *offsets) -> np.ndarray:
        """(H, W, 3) uint8 in, centre-cropped and resized with Pillow's default (bicubic) to the native size."""
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top : top + side, left : left + side]
        return np.array(Image.fromarray(image).resize((self.size, self.size)))

    def _check_hook(self) -> None:
        """Their ``invert`` hooks every attention module through ``register_attention_control``; a version written
        for another diffusers would silently leave the modules as they are (or fail later), so check it now."""
        attention = [m for m in self.unet.modules() if type(m).__name__ == "Attention"]
        before = [m.__dict__.get("forward") for m in attention]
        self.ptp_utils.register_attention_control(self.pipe, None)
        hooked = sum(m.__dict__.get("forward") is not b for m, b in zip(attention, before))
        if hooked != len(attention) or not attention:
            raise ValueError(
                f"the checkout's ptp_utils.register_attention_control hooked {hooked} of {len(attention)} attention "
                "modules of this diffusers version; use a ptp_utils written for it"
            )

    def invert(self, pixels: Tensor, prompt: str) -> tuple[Tensor, list[Tensor]]:
        """pixels: (3, H, W) in [-1, 1] at the native size."""
        image = ((pixels.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        with redirect_stdout(io.StringIO()):  # some versions of their loop print a line per timestep
            _, z_T, nulls = self.null_inversion.invert(
                image, prompt, num_inner_steps=self.num_inner_steps, early_stop_epsilon=self.early_stop_epsilon
            )
        return z_T[0].detach(), [n.detach() for n in nulls]
