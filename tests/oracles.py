"""External oracles shared by the family tests: our guided sampler against diffusers' own pipeline."""

from __future__ import annotations

import torch

from nti_lightning.ddim import schedule_from_scheduler
from nti_lightning.sampling import ddim_sample, unet_denoiser


def sampler_and_pipeline(model, T: int, prompt: str, latent: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ∅_t = the model's null, from one seeded z_T: (our DDIM sampler at w = 7.5, ``model.pipeline``'s
    latents with ``guidance_scale=7.5, num_inference_steps=T``), each (1, 4, latent, latent)."""
    z_T = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    schedule = schedule_from_scheduler(model.scheduler, T)
    cond = model.family.encode_prompts(model, [prompt])
    ours = ddim_sample(unet_denoiser(model.unet, model.family), schedule, z_T, cond, model.family.null(model), 7.5)
    theirs = model.pipeline(
        prompt, latents=z_T.clone(), guidance_scale=7.5, num_inference_steps=T, output_type="latent"
    ).images
    return ours, theirs
