"""Weights the embedded tiny models share: one copy in the package, assembled at load time.

``tiny``, ``tiny-sd2-v`` and ``tiny-sdxl`` are trained on one VAE (``scripts/train_tiny.py``), and ``tiny-sdxl``'s
first text encoder is ``tiny``'s. Their folders keep every component's ``config.json`` (so ``detect.inspect_folder``
and the family detection read them as any diffusers folder), but a shared component's weights are stored once,
in the folder named by ``SHARED_WEIGHTS``. ``shared_components`` loads them for ``load_model``; where the
configs differ only in the latent scale (``tiny-sdxl``'s VAE has SDXL's ``scaling_factor`` 0.13025 and
``force_upcast``), ``refold_scaling_factor`` rescales the weights so that the scaled latents are unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
"""The package's embedded folders (models, sample photos, the PIE sample)."""

SHARED_WEIGHTS: dict[str, dict[str, str]] = {
    "tiny_sd2": {"vae": "tiny"},
    "tiny_sdxl": {"vae": "tiny", "text_encoder": "tiny"},
}
"""Embedded folder → {component: the embedded folder (a sibling) whose weights it uses}."""


@torch.no_grad()
def refold_scaling_factor(vae, scaling_factor: float, force_upcast: bool) -> None:
    """Gives a trained VAE another ``scaling_factor`` without changing the scaled latents it produces.

    With s = old / new: E'(x) = s·E(x) and D'(z) = D(z / s), so new · E'(x) = old · E(x) (the UNet sees the
    same latents) and D'(E'(x)) = D(E(x)). The posterior's log-variance rows of ``quant_conv`` move by 2 log s.
    """
    lc = vae.config.latent_channels
    s = vae.config.scaling_factor / scaling_factor
    vae.quant_conv.weight[:lc] *= s
    vae.quant_conv.bias[:lc] *= s
    vae.quant_conv.bias[lc:] += 2 * math.log(s)
    vae.post_quant_conv.weight /= s
    vae.register_to_config(scaling_factor=scaling_factor, force_upcast=force_upcast)


def shares_weights(folder: Path) -> bool:
    """Whether ``folder`` is one of the package's embedded folders that takes some weights from another."""
    return folder.name in SHARED_WEIGHTS and Path(folder).resolve().parent == ASSETS_DIR


def shared_components(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The components of embedded ``folder`` stored in another folder, loaded and fitted to ``folder``'s configs:
    ``{"vae": AutoencoderKL, "text_encoder": CLIPTextModel}`` as listed in ``SHARED_WEIGHTS`` (empty for others).

    Weights are read in fp32 (the refold is exact there), then cast to ``dtype``.
    """
    if not shares_weights(folder):
        return {}
    out: dict[str, Any] = {}
    for name, source in SHARED_WEIGHTS[folder.name].items():
        src = folder.parent / source / name
        config = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
        if name == "vae":
            from diffusers import AutoencoderKL

            from nti_lightning.models.compat import dtype_kwargs

            vae = AutoencoderKL.from_pretrained(src, **dtype_kwargs(torch.float32))
            if vae.config.scaling_factor != config["scaling_factor"]:
                refold_scaling_factor(vae, config["scaling_factor"], bool(config.get("force_upcast", False)))
            out[name] = vae.to(dtype).eval()
        elif name == "text_encoder":
            from transformers import CLIPTextModel

            encoder = CLIPTextModel.from_pretrained(src).float()  # fp32 as stored (dtype= is new in transformers 5)
            if encoder.config.hidden_size != config["hidden_size"]:
                raise ValueError(f"{folder / name} and {src} differ in hidden_size; retrain with train_tiny.py")
            out[name] = encoder.to(dtype).eval()
        else:
            raise ValueError(f"no loader for shared component {name!r}")
    return out


def drop_shared_weight_files(folder: Path) -> list[Path]:
    """Deletes the weight files of ``folder``'s shared components (``train_tiny.py`` after saving a shipped
    folder), keeping their configs. Returns the files removed."""
    removed = []
    for name in SHARED_WEIGHTS.get(folder.name, {}):
        for f in sorted((folder / name).iterdir()):
            if f.suffix in (".safetensors", ".bin"):
                f.unlink()
                removed.append(f)
    return removed
