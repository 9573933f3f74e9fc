"""Benchmarking the inversion engine: models to time it on, the authors' loop to compare with, FLOP counts.

- ``baseline``: the authors' per-image loop (fp32, recomputed conditional branch, weight gradients on);
- ``flops``: FlopCounterMode counts of a UNet forward and forward+backward, and the per-image floor;
- ``sd15``: SD1.5-shaped components with random weights, built from configs (no download);
- here: the benchmark's models, synthetic images, and measuring a run (time, peak memory).

``scripts/benchmark.py`` drives them and writes bench.json, bench.md and throughput.png.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------------------

PROMPTS = (
    "a photo of a cat sitting on a wooden bench",
    "a red car parked in front of a house",
    "a bowl of fruit on a kitchen table",
    "a mountain lake at sunset",
)


def build_bench_model(name: str, device: str | torch.device = "cpu", seed: int = 0):
    """``"tiny"``: the shipped trained tiny model when present, else the tiny architecture with random weights;
    ``"sd15"`` / ``"sdxl"``: SD1.5's / SDXL base's architecture with random weights; a local diffusers folder:
    that model. Returns an ``NTIModel``."""
    from pathlib import Path

    from nti_lightning.models import load_model, model_from_components
    from nti_lightning.models.tiny import TINY_DIR

    if name == "sd15":
        from nti_bench.sd15 import build_sd15_model

        return build_sd15_model(device=device, seed=seed)
    if name == "sdxl":
        from nti_bench.sdxl import build_sdxl_model

        return build_sdxl_model(device=device, seed=seed)
    if name != "tiny":
        if Path(name).is_dir():
            return load_model(name, device=device)
        raise ValueError(f"unknown benchmark model {name!r}; use 'tiny', 'sd15', 'sdxl' or a diffusers folder")
    if (TINY_DIR / "model_index.json").is_file():
        return load_model("tiny", device=device)
    model = model_from_components(**tiny_random_components(seed), source="tiny-random")
    return model if torch.device(device) == model.device else model.to(device)


def tiny_random_components(seed: int = 0) -> dict:
    """``models.tiny.build_random_components``, with the benchmark's byte-level tokenizer standing in while
    the tiny model's trained tokenizer files are not there."""
    from nti_lightning.models import tiny

    try:
        return tiny.build_random_components(seed)
    except FileNotFoundError:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from nti_bench.sd15 import fallback_tokenizer

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**tiny.UNET_CONFIG)
            torch.manual_seed(seed + 1)
            vae = AutoencoderKL(**tiny.VAE_CONFIG)
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(CLIPTextConfig(**tiny.TEXT_ENCODER_CONFIG))
        return {
            "unet": unet.eval(),
            "vae": vae.eval(),
            "text_encoder": text_encoder.eval(),
            "tokenizer": fallback_tokenizer(tiny.VOCAB_SIZE, tiny.MAX_TEXT_LENGTH),
            "scheduler": tiny.build_scheduler(),
        }


def synthetic_images(n: int, size: int, seed: int = 0) -> Tensor:
    """(n, 3, size, size) in [-1, 1]: smooth random colour fields plus fine texture, seeded.

    Image content does not change the cost of an inversion except through early stopping; these give the
    VAE and UNet natural-image-like statistics (mostly low frequencies) without shipping photos.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g) * 2 - 1  # (n, 3, 6, 6)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    texture = 0.1 * torch.randn(n, 3, size, size, generator=g)
    return (smooth + texture).clamp(-1, 1)


def prompts_for(n: int) -> list[str]:
    return [PROMPTS[k % len(PROMPTS)] for k in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    seconds: float
    peak_memory_bytes: int | None  # CUDA: max allocated; CPU: peak resident set above the start
    memory_kind: str


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measure(device: torch.device):
    """Times the block (synchronising CUDA) and records its peak memory; yields a ``Measurement`` filled on exit.

    On CPU the resident set is sampled every 5 ms from a thread (Linux /proc), relative to the start.
    """
    m = Measurement(seconds=0.0, peak_memory_bytes=None, memory_kind="none")
    stop = threading.Event()
    sampler = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        m.memory_kind = "cuda_max_allocated"
    elif os.path.exists("/proc/self/statm"):
        start_rss = _rss_bytes()
        peak = [start_rss]

        def sample() -> None:
            while not stop.wait(0.005):
                peak[0] = max(peak[0], _rss_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        m.memory_kind = "cpu_rss_above_start"
    start = time.perf_counter()
    try:
        yield m
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        m.seconds = time.perf_counter() - start
        if device.type == "cuda":
            m.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
        elif sampler is not None:
            stop.set()
            sampler.join()
            peak[0] = max(peak[0], _rss_bytes())
            m.peak_memory_bytes = peak[0] - start_rss
