"""How the engine runs: plain PyTorch, or Lightning Fabric supplying device, precision and the optimiser step.

With Fabric (one process per rank, ``run.launch``): the UNet calls run under ``fabric.autocast()``; the loss is
back-propagated with ``fabric.backward`` and the per-row Adam (``nulltext.RowAdam``, set up with
``fabric.setup_optimizers``) steps through the precision plugin, whose scaler for 16-mixed is
``nulltext.RowLossScaler`` (per-row overflow test: a ``torch.amp.GradScaler`` would skip every image's step when
one overflows). The slot bank itself is not wrapped by ``fabric.setup_module``: the wrapper casts every floating
input of a forward to the autocast dtype, which would round the pivot target z*_{t−1} and z̄_t to fp16 in the
loss and the DDIM step (``tests/engine/test_runtime.py`` pins it); the UNet alone autocasts, the DDIM
arithmetic and the loss stay fp32.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from nti_lightning.engine.nulltext import RowLossScaler
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
        """The precision the UNet runs in: Fabric's precision plugin's ("32-true", "bf16-mixed", "16-mixed")."""
        if self.fabric is None:
            return "32-true"
        return str(self.fabric.strategy.precision.precision)

    def setup_optimizer(self, optimizer: torch.optim.Optimizer):
        """The optimiser whose ``step()`` goes through Fabric's strategy and precision plugin (itself without)."""
        return self.fabric.setup_optimizers(optimizer) if self.fabric is not None else optimizer

    def backward(self, loss: torch.Tensor) -> None:
        """``fabric.backward`` (16-mixed: the loss scaled by the precision plugin's scaler) or plain backward."""
        if self.fabric is not None:
            self.fabric.backward(loss)
        else:
            loss.backward()

    def precision_state(self) -> dict:
        """The precision plugin's state (16-mixed: the loss scale), for checkpoints."""
        return self.fabric.strategy.precision.state_dict() if self.fabric is not None else {}

    def load_precision_state(self, state: dict | None) -> None:
        if self.fabric is not None and state:
            self.fabric.strategy.precision.load_state_dict(state)


def precision_plugins(precision: str, device_type: str) -> dict:
    """Fabric's precision arguments: 16-mixed as Lightning's ``MixedPrecision`` plugin with the per-row scaler
    (on CPU too: Fabric alone would silently run bf16 there), any other precision by name."""
    if precision == "16-mixed":
        from lightning.fabric.plugins import MixedPrecision

        return {"plugins": [MixedPrecision("16-mixed", device_type, scaler=RowLossScaler())]}
    return {"precision": precision}


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``trainer.precision="auto"`` → the fastest precision that loses < 0.5 dB PSNR against fp32.

    On a CUDA GPU that is ``16-mixed`` (fp16 autocast with the per-row loss scale): on the bundled tiny model it
    loses 0.06 dB mean / 0.21 dB worst against fp32, where ``bf16-mixed`` (8-bit mantissa) loses 1.06 / 2.59 dB
    (``scripts/precision_benchmark.py``, docs/scaleout.md); on tensor cores both run at the same speed. On CPU
    (and MPS) ``32-true``: mixed precision is slower there without AMX, and fp32 keeps resume bit-exact. Any other
    value is returned unchanged.
    """
    if precision != "auto":
        return precision
    on_cuda = accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available()
    return "16-mixed" if on_cuda else "32-true"
