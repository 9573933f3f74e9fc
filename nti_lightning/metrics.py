"""Reconstruction metrics (torchmetrics) and the side-by-side strip."""

from __future__ import annotations

import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image, (B, C, H, W) in [0, 1] → (B,): torchmetrics' ``peak_signal_noise_ratio`` with data
    range 1 over each image's values; identical images give +inf. The one PSNR of the package (the run's metrics
    here, PIE-Bench's masked ones in ``eval/metrics.py``)."""
    return peak_signal_noise_ratio(pred.float(), target.float(), data_range=1.0, reduction="none", dim=(1, 2, 3))


def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of (3, H, W) images in [-1, 1], computed on [0, 1]."""
    p = ((pred.float().clamp(-1, 1) + 1) / 2)[None]
    t = ((target.float().clamp(-1, 1) + 1) / 2)[None]
    return {
        "psnr": float(psnr_per_image(p, t)[0]),
        "ssim": float(structural_similarity_index_measure(p, t, data_range=1.0)),
    }


def latent_mse_value(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean())


def make_strip(images: list[Image.Image], gap: int = 4) -> Image.Image:
    """Images side by side on a white background (all resized to the first one's height)."""
    h = images[0].height
    resized = [im if im.height == h else im.resize((round(im.width * h / im.height), h)) for im in images]
    strip = Image.new("RGB", (sum(im.width for im in resized) + gap * (len(resized) - 1), h), "white")
    x = 0
    for im in resized:
        strip.paste(im, (x, 0))
        x += im.width + gap
    return strip
