"""How the loop runs its UNet calls, backward passes and optimizer steps: plain PyTorch or Lightning Fabric.

With Fabric, mixed precision comes from ``fabric.autocast()`` around UNet calls (the module is never
wrapped: an unwrapped module gets no autocast, and wrapping would all-reduce gradients under DDP — see
shared LIGHTNING-NOTES), ``fabric.backward`` applies the 16-mixed GradScaler, and
``fabric.setup_optimizers`` routes ``step()`` through the precision plugin.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from nti_lightning.engine import Denoiser, unet_denoiser


@dataclass
class Runtime:
    fabric: object | None = None  # lightning.fabric.Fabric

    def autocast(self):
        return self.fabric.autocast() if self.fabric is not None else nullcontext()

    def denoiser(self, unet, per_sample: bool = False) -> Denoiser:
        denoise = unet_denoiser(unet, self.autocast if self.fabric is not None else None)
        return one_at_a_time(denoise) if per_sample else denoise

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return self.fabric.setup_optimizers(optimizer) if self.fabric is not None else optimizer

    def backward(self, loss: torch.Tensor) -> None:
        if self.fabric is not None:
            self.fabric.backward(loss)
        else:
            loss.backward()

    @property
    def scaler(self):
        """The 16-mixed GradScaler, if any."""
        if self.fabric is None:
            return None
        return getattr(self.fabric._precision, "scaler", None)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Steps; returns False when a GradScaler skipped the step for inf/NaN gradients."""
        scaler = self.scaler
        if scaler is None:
            optimizer.step()
            return True
        before = scaler.get_scale()
        optimizer.step()
        return scaler.get_scale() >= before


# Measured by scripts/precision_benchmark.py on the bundled tiny model (README, Precision): the PSNR of the
# NTI reconstruction each mixed mode loses against fp32. "auto" takes the fastest mode under 0.5 dB.
AUTO_PRECISION_MAX_LOSS_DB = 0.5


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``trainer.precision="auto"`` → the fastest precision that loses < 0.5 dB PSNR against fp32.

    On a CUDA GPU with bf16 tensor cores (Ampere and newer) that is ``bf16-mixed``: as fast as fp16 and no
    GradScaler (no skipped steps, no unscale pass); on older CUDA GPUs ``16-mixed``. On CPU (and MPS)
    ``32-true``: mixed precision is slower there without AMX, and fp32 keeps resume bit-exact.
    Any other value is returned unchanged.
    """
    if precision != "auto":
        return precision
    on_cuda = accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available()
    if not on_cuda:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"


def one_at_a_time(fn):
    """Calls ``fn`` row by row over the leading dimension of every tensor argument and concatenates: the
    numbers of a batch of B equal B separate calls (``InversionConfig.batch_invariant``)."""

    def call(*args):
        n = next(a.shape[0] for a in args if torch.is_tensor(a) and a.dim() > 0)
        rows = [fn(*(a[k : k + 1] if torch.is_tensor(a) and a.dim() > 0 else a for a in args)) for k in range(n)]
        return torch.cat(rows)

    return call
