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


def one_at_a_time(fn):
    """Calls ``fn`` row by row over the leading dimension of every tensor argument and concatenates: the
    numbers of a batch of B equal B separate calls (``InversionConfig.batch_invariant``)."""

    def call(*args):
        n = next(a.shape[0] for a in args if torch.is_tensor(a) and a.dim() > 0)
        rows = [fn(*(a[k : k + 1] if torch.is_tensor(a) and a.dim() > 0 else a for a in args)) for k in range(n)]
        return torch.cat(rows)

    return call
