"""Diffusion building blocks around the UNet and VAE: the denoiser, encode, decode, DDIM inversion and guided
sampling (the reconstruction and editing sampler).

Each function takes a ``denoiser(z, t, cond) -> model output`` (float32) rather than a UNet, so precision,
attention control and call counting are the caller's business (see ``runtime.Runtime.denoiser``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from nti_lightning.engine.ddim import DDIMSchedule, classifier_free_guidance, ddim_inverse_step, ddim_step
from nti_lightning.models.family import Cond, Family, cat_cond

Denoiser = Callable[[Tensor, Tensor, Cond], Tensor]
"""(z (B, C, h, w), t () or (B,) long, cond {key: (B, …)}) → model output (ε or v) (B, C, h, w) float32."""


def unet_denoiser(unet, family: Family, autocast=None) -> Denoiser:
    """Wraps a diffusers UNet2DConditionModel as a float32 predictor, under ``autocast()`` if given."""

    def denoise(z: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if autocast is None:
            # the first weight's dtype: diffusers' ``unet.dtype`` walks every module and tensor (2 ms a call, ~4% of
            # an inner step of the tiny model on a CPU)
            dtype = next(unet.parameters()).dtype
            kwargs = family.unet_kwargs({k: v.to(dtype) for k, v in cond.items()})
            return unet(z.to(dtype), t, **kwargs, return_dict=False)[0].float()
        with autocast():
            return unet(z, t, **family.unet_kwargs(cond), return_dict=False)[0].float()

    return denoise


def one_at_a_time(denoise: Denoiser) -> Denoiser:
    """Evaluates row by row and concatenates: the numbers of a batch of B equal B separate calls
    (``InversionConfig.batch_invariant``)."""

    def call(z: Tensor, t: Tensor, cond: Cond) -> Tensor:
        rows = []
        for k in range(z.shape[0]):
            t_k = t[k : k + 1] if t.dim() > 0 else t
            rows.append(denoise(z[k : k + 1], t_k, {n: v[k : k + 1] for n, v in cond.items()}))
        return torch.cat(rows)

    return call


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------


LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextmanager
def vae_in_float32(vae) -> Iterator[None]:
    """The VAE's weights in fp32 for the block, then back (diffusers' ``upcast_vae``, undone afterwards)."""
    before = vae.dtype
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(before)


def run_vae(model, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)`` (an encode or decode) in the VAE's dtype → float32, or in fp32 when the family asks for it
    (``Family.vae_force_upcast``: SDXL's VAE overflows in fp16) or when the fp16/bf16 result is not finite."""
    vae = model.vae
    if vae.dtype not in LOW_PRECISION:
        return fn(x.to(vae.device, vae.dtype)).float()
    if not model.family.vae_force_upcast:
        out = fn(x.to(vae.device, vae.dtype)).float()
        if torch.isfinite(out).all():
            return out
    with vae_in_float32(vae):  # forced, or a non-finite low-precision result: retry in fp32
        return fn(x.to(vae.device, torch.float32)).float()


@torch.no_grad()
def encode_latents(model, images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] → z*_0 (B, 4, H/8, W/8): mean of the latent distribution × scaling factor."""
    mean = run_vae(model, lambda x: model.vae.encode(x).latent_dist.mean, images)
    return mean * model.scaling_factor


@torch.no_grad()
def decode_latents(model, latents: Tensor) -> Tensor:
    """(B, 4, h, w) → (B, 3, 8h, 8w) in [-1, 1] (clamped)."""
    return run_vae(model, lambda z: model.vae.decode(z).sample, latents / model.scaling_factor).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------
# DDIM inversion and guided sampling, for a batch in lockstep
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def ddim_inversion(
    denoiser: Denoiser,
    schedule: DDIMSchedule,
    z0: Tensor,
    cond: Cond,
    guidance_scale: float = 1.0,
    null: Cond | None = None,
) -> Tensor:
    """DDIM inversion z*_0 → z*_T (Algorithm 1, line 4; w = 1 by default: the conditional branch only).

    z0: (B, C, h, w); cond: (B, …) → trajectory (T + 1, B, C, h, w) with trajectory[k] = z*_k in inversion
    order: [0] is z*_0 (the image latent), [T] is z*_T. Timesteps are taken in reverse (1, 21, …).
    """
    z = z0.float()
    trajectory = [z]
    for t in schedule.timesteps.flip(0):
        if guidance_scale == 1.0:
            out = denoiser(z, t, cond)
        else:
            if null is None:
                raise ValueError("ddim_inversion with guidance_scale != 1 needs the null conditioning")
            out_uncond, out_cond = denoiser(torch.cat([z, z]), t, cat_cond([null, cond])).chunk(2)
            out = classifier_free_guidance(out_uncond, out_cond, guidance_scale)
        z = ddim_inverse_step(schedule, z, out, int(t))
        trajectory.append(z)
    return torch.stack(trajectory)  # (T + 1, B, C, h, w)


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    schedule: DDIMSchedule,
    z_T: Tensor,
    cond: Cond,
    nulls: Cond | list[Cond],
    guidance_scale: float,
    callback: Callable[[int, Tensor], Tensor | None] | None = None,
    guidance=None,
) -> Tensor:
    """Classifier-free guided DDIM sampling from z_T (the reconstruction / editing sampler).

    z_T: (B, C, h, w); cond: (B, …); nulls: one ∅_t per timestep (a list of T conditionings, as NTI returns)
    or one fixed null for every step. Each step is one UNet call on the batch [∅ half, C half] (the layout
    Prompt-to-Prompt controllers expect). ``callback(i, z)`` may return a replacement latent (local blend).
    ``guidance`` (a ``step_guidance.StepGuidance``, from the record) replaces the guided prediction and may change
    the latent after each DDIM step, before the callback (proxnpi, direct). Returns z_0 (B, C, h, w).
    """
    z = z_T.float()
    for i, t in enumerate(schedule.timesteps):
        null = nulls[i] if isinstance(nulls, list) else nulls
        out_uncond, out_cond = denoiser(torch.cat([z, z]), t, cat_cond([null, cond])).chunk(2)  # (B, C, h, w)
        if guidance is None:
            z = ddim_step(schedule, z, classifier_free_guidance(out_uncond, out_cond, guidance_scale), int(t))
        else:
            eps = guidance.combine(i, int(t), out_uncond, out_cond, guidance_scale)
            z = guidance.after_step(i, int(t), ddim_step(schedule, z, eps, int(t)))
        if callback is not None:
            replaced = callback(i, z)
            if replaced is not None:
                z = replaced
    return z
