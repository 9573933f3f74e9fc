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


def _text_time_inputs(config: dict, batch_size: int, grad: bool, dtype) -> dict:
    """SDXL (``addition_embed_type="text_time"``): the pooled ``text_embeds`` (with grad: NTI optimises them)
    and the six ``time_ids``, on ``meta``."""
    if config.get("addition_embed_type") != "text_time":
        return {}
    pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
    text_embeds = torch.empty(batch_size, pooled, device="meta", dtype=dtype).requires_grad_(grad)  # (B, 1280)
    time_ids = torch.empty(batch_size, 6, device="meta", dtype=dtype)  # (B, 6)
    return {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}


def count_unet_flops(
    unet_config,
    latent_size: int | None = None,
    batch_size: int = 1,
    text_length: int = 77,
    dtype: torch.dtype = torch.float32,
) -> UNetFlops:
    """Counts one forward and one forward+backward (to the text embeddings) of a ``UNet2DConditionModel``.

    unet_config: the model's ``config`` (or a dict of constructor arguments); latent_size defaults to its
    ``sample_size``. Counted at ``batch_size`` on ``meta`` and returned per image (the count is linear in
    the batch). SDXL UNets (``text_time``) also get the pooled embedding (backward to it too) and time ids.
    """
    unet, config = meta_unet(unet_config, dtype)
    size = int(latent_size or config["sample_size"])
    z = torch.empty(batch_size, config["in_channels"], size, size, device="meta", dtype=dtype)  # (B, C, h, w)
    t = torch.tensor(981)

    def run(grad: bool) -> float:
        context = torch.empty(batch_size, text_length, config["cross_attention_dim"], device="meta", dtype=dtype)
        context.requires_grad_(grad)  # (B, L, D)
        extra = _text_time_inputs(config, batch_size, grad, dtype)
        with FlopCounterMode(display=False) as counter:
            with torch.set_grad_enabled(grad):
                eps = unet(z, t, encoder_hidden_states=context, return_dict=False, **extra)[0]  # (B, C, h, w)
                if grad:
                    eps.float().pow(2).mean().backward()
        return counter.get_total_flops() / batch_size

    return UNetFlops(forward=run(False), forward_backward=run(True), latent_size=size, text_length=text_length)


def meta_unet(unet_config, dtype: torch.dtype = torch.float32):
    """A frozen ``UNet2DConditionModel`` built on ``meta`` (no memory) with the classic attention processor
    (plain matmuls, counted on every device) → (unet, its constructor config)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet.to(dtype).requires_grad_(False).eval()
    unet.set_attn_processor(AttnProcessor())
    return unet, config


def saved_activation_bytes(unet_config, latent_size: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
    """Bytes autograd saves for the backward of one forward to the text embeddings (an upper bound on the
    inner step's activation memory: tensors saved twice, or views of one another, count each time), on ``meta``."""
    unet, config = meta_unet(unet_config, dtype)
    z = torch.empty(batch_size, config["in_channels"], latent_size, latent_size, device="meta", dtype=dtype)
    context = torch.empty(batch_size, 77, config["cross_attention_dim"], device="meta", dtype=dtype)
    context.requires_grad_(True)
    total = 0

    def pack(x: torch.Tensor):
        nonlocal total
        total += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        unet(z, torch.tensor(981), encoder_hidden_states=context, **_text_time_inputs(config, batch_size, True, dtype))
    return total


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
