"""FLOPs of the inversion, counted with ``torch.utils.flop_counter.FlopCounterMode`` rather than guessed.

The UNet is rebuilt from its config on the ``meta`` device, so counting SD1.5 at 512 px costs ~5 s of
Python on a CPU and no memory. Attention is counted through its matmuls (on ``meta`` SDPA decomposes into
them, and the classic processor is used when counting anywhere else), convolutions and linear layers
through their own formulas; element-wise ops (norms, activations, the DDIM step, Adam) are not counted,
as is usual. Backward is to the text embeddings only: the weights are frozen, so autograd computes input
gradients and no weight gradients.

Per image, Algorithm 1 of Mokady et al. (2023) costs, with T timesteps and n_t inner steps at timestep t:
T forwards for the pivot (DDIM inversion, w = 1), T conditional forwards, Σ n_t forward+backward passes of
the unconditional branch and T unconditional forwards for z̄_{t−1} — plus T more conditional forwards in the
authors' code, which recomputes that branch. The floor quoted in the README is the worst case n_t = N.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class UNetFlops:
    """FLOPs of one UNet evaluation on one image (batch 1) at a given latent size."""

    forward: float
    forward_backward: float  # forward + backward to encoder_hidden_states
    latent_size: int
    text_length: int

    @property
    def backward(self) -> float:
        return self.forward_backward - self.forward

    def to_dict(self) -> dict:
        return {**asdict(self), "backward": self.backward}


def count_unet_flops(
    unet_config,
    latent_size: int | None = None,
    batch_size: int = 1,
    text_length: int = 77,
) -> UNetFlops:
    """Counts one forward and one forward+backward (to the text embeddings) of a ``UNet2DConditionModel``.

    unet_config: the model's ``config`` (or a dict of constructor arguments); latent_size defaults to its
    ``sample_size``. Counted at ``batch_size`` on ``meta`` and returned per image (the count is linear in
    the batch).
    """
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet.requires_grad_(False).eval()
    unet.set_attn_processor(AttnProcessor())  # plain matmuls: counted on every device
    size = int(latent_size or config["sample_size"])
    z = torch.empty(batch_size, config["in_channels"], size, size, device="meta")  # (B, C, h, w)
    t = torch.tensor(981)

    def run(grad: bool) -> float:
        context = torch.empty(batch_size, text_length, config["cross_attention_dim"], device="meta")  # (B, L, D)
        context.requires_grad_(grad)
        with FlopCounterMode(display=False) as counter:
            with torch.set_grad_enabled(grad):
                eps = unet(z, t, encoder_hidden_states=context, return_dict=False)[0]  # (B, C, h, w)
                if grad:
                    eps.float().pow(2).mean().backward()
        return counter.get_total_flops() / batch_size

    return UNetFlops(forward=run(False), forward_backward=run(True), latent_size=size, text_length=text_length)


@dataclass(frozen=True)
class InversionCalls:
    """UNet evaluations per image of one inversion (pivot included)."""

    forward: float  # evaluations without grad
    forward_backward: float  # inner steps: evaluations with backward (a mean over a batch may be fractional)

    def flops(self, unet: UNetFlops) -> float:
        return self.forward * unet.forward + self.forward_backward * unet.forward_backward


def inversion_calls(num_steps: int, inner_steps: float, recompute_cond: bool = False) -> InversionCalls:
    """Per-image evaluations for T = ``num_steps`` and ``inner_steps`` = Σ_t n_t applied Adam steps.

    Pivot T + conditional T + final unconditional T (+ T recomputed conditional in the authors' loop).
    """
    return InversionCalls(forward=(4 if recompute_cond else 3) * num_steps, forward_backward=inner_steps)


def floor_flops(unet: UNetFlops, num_steps: int, num_inner_steps: int) -> float:
    """Worst-case FLOPs per image with no redundant call: every timestep runs all N inner steps."""
    return inversion_calls(num_steps, num_steps * num_inner_steps).flops(unet)
