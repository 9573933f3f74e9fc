"""Diffusion building blocks around the UNet and VAE: encode, decode, DDIM inversion, guided sampling.

Each function takes a ``denoiser(z, t, context) -> ε`` (float32) rather than a UNet, so precision,
attention control and call counting are the caller's business (see ``runtime.Runtime.denoiser``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from nti_lightning.ddim import DDIMSchedule, classifier_free_guidance, ddim_inverse_step, ddim_step

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(z (B, C, h, w), t () long, context (B, L, D)) → ε (B, C, h, w) float32."""


def unet_denoiser(unet, autocast=None) -> Denoiser:
    """Wraps a diffusers UNet2DConditionModel as a float32 ε-predictor, under ``autocast()`` if given."""

    def denoise(z: Tensor, t: Tensor, context: Tensor) -> Tensor:
        dtype = next(unet.parameters()).dtype
        if autocast is None:
            return unet(z.to(dtype), t, encoder_hidden_states=context.to(dtype), return_dict=False)[0].float()
        with autocast():
            return unet(z, t, encoder_hidden_states=context, return_dict=False)[0].float()

    return denoise


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latents(model, images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] → z*_0 (B, 4, H/8, W/8): mean of the latent distribution × scaling factor."""
    x = images.to(model.vae.device, model.vae.dtype)
    return model.vae.encode(x).latent_dist.mean.float() * model.scaling_factor


@torch.no_grad()
def decode_latents(model, latents: Tensor) -> Tensor:
    """(B, 4, h, w) → (B, 3, 8h, 8w) in [-1, 1] (clamped)."""
    z = (latents / model.scaling_factor).to(model.vae.device, model.vae.dtype)
    return model.vae.decode(z).sample.float().clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------
# DDIM inversion (the pivot) and guided sampling
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def ddim_inversion(
    denoiser: Denoiser,
    schedule: DDIMSchedule,
    z0: Tensor,
    cond: Tensor,
    guidance_scale: float = 1.0,
    null: Tensor | None = None,
) -> Tensor:
    """DDIM inversion z*_0 → z*_T (Algorithm 1, line 4; w = 1 by default: the conditional branch only).

    z0: (B, C, h, w); cond: (B, L, D) → trajectory (T + 1, B, C, h, w) with trajectory[k] = z*_k in
    inversion order: [0] is z*_0 (the image latent), [T] is z*_T. Timesteps are taken in reverse (1, 21, …).
    """
    z = z0.float()
    trajectory = [z]
    for t in schedule.timesteps.flip(0):
        if guidance_scale == 1.0:
            eps = denoiser(z, t, cond)
        else:
            if null is None:
                raise ValueError("ddim_inversion with guidance_scale != 1 needs the null embedding")
            eps_uncond, eps_cond = denoiser(torch.cat([z, z]), t, torch.cat([null, cond])).chunk(2)
            eps = classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)
        z = ddim_inverse_step(schedule, z, eps, int(t))
        trajectory.append(z)
    return torch.stack(trajectory)  # (T + 1, B, C, h, w)


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    schedule: DDIMSchedule,
    z_T: Tensor,
    cond: Tensor,
    null_embeddings: Tensor,
    guidance_scale: float,
    callback: Callable[[int, Tensor], Tensor | None] | None = None,
) -> Tensor:
    """Classifier-free guided DDIM sampling from z_T (the reconstruction / editing sampler).

    z_T: (B, C, h, w); cond: (B, L, D); null_embeddings: (T, B, L, D) — one ∅_t per timestep, as NTI
    returns — or (B, L, D) for a fixed ψ(""). Each step is one UNet call on the batch [∅ half, C half]
    (the layout Prompt-to-Prompt controllers expect). ``callback(i, z)`` may return a replacement latent
    (local blend). Returns z_0 (B, C, h, w).
    """
    z = z_T.float()
    per_step = null_embeddings.dim() == 4
    for i, t in enumerate(schedule.timesteps):
        null = null_embeddings[i] if per_step else null_embeddings
        context = torch.cat([null.to(cond.dtype), cond])  # (2B, L, D)
        eps_uncond, eps_cond = denoiser(torch.cat([z, z]), t, context).chunk(2)  # (B, C, h, w) each
        z = ddim_step(schedule, z, classifier_free_guidance(eps_uncond, eps_cond, guidance_scale), int(t))
        if callback is not None:
            replaced = callback(i, z)
            if replaced is not None:
                z = replaced
    return z
