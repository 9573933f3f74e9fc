"""How the engine runs its UNet calls: plain PyTorch or under Lightning Fabric's precision.

With Fabric, mixed precision comes from ``fabric.autocast()`` around UNet calls. The modules are never wrapped
by ``fabric.setup``: wrapping would broadcast rank 0's parameters and all-reduce gradients under DDP, and
every rank inverts its own images (with Lightning 2.6 a DDP-wrapped module averages the nulls'
gradients across ranks, mixing different images). Gradients are taken with ``torch.autograd.grad``
on the gathered null embeddings of each call; 16-mixed's loss scaling is ``nulltext.DynamicLossScale``, per
image, because a GradScaler skips the step of every image when one overflows.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from nti_lightning.engine.sampling import Denoiser, one_at_a_time, unet_denoiser


@dataclass
class Runtime:
    fabric: object | None = None  # lightning.fabric.Fabric

    def autocast(self):
        return self.fabric.autocast() if self.fabric is not None else nullcontext()

    def denoiser(self, unet, family, per_sample: bool = False) -> Denoiser:
        denoise = unet_denoiser(unet, family, self.autocast if self.fabric is not None else None)
        return one_at_a_time(denoise) if per_sample else denoise

    @property
    def precision(self) -> str:
        """The precision the UNet runs in: Fabric's ("32-true", "bf16-mixed", "16-mixed"), else "32-true"."""
        if self.fabric is None:
            return "32-true"
        return str(getattr(self.fabric._precision, "precision", "32-true"))


# Measured by scripts/precision_benchmark.py on the bundled tiny model (README, Precision): the PSNR of the
# NTI reconstruction each mixed mode loses against fp32. "auto" takes the fastest mode under 0.5 dB.
AUTO_PRECISION_MAX_LOSS_DB = 0.5


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``trainer.precision="auto"`` → the fastest precision that loses < 0.5 dB PSNR against fp32.

    On a CUDA GPU that is ``16-mixed`` (fp16 autocast with a GradScaler): on the bundled tiny model it loses
    0.06 dB mean / 0.21 dB worst against fp32, where ``bf16-mixed`` (8-bit mantissa) loses 1.06 / 2.59 dB; on
    tensor cores both run at the same speed. On CPU (and MPS) ``32-true``: mixed precision is slower there
    without AMX, and fp32 keeps resume bit-exact.
    Any other value is returned unchanged.
    """
    if precision != "auto":
        return precision
    on_cuda = accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available()
    if not on_cuda:
        return "32-true"
    return "16-mixed"
