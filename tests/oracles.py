"""External oracles shared by the family tests: our guided sampler against diffusers' own pipeline."""

from __future__ import annotations

import torch

from nti_lightning.engine.ddim import schedule_from_scheduler
from nti_lightning.engine.sampling import ddim_sample, unet_denoiser


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


def assert_nti_beats_cfg(model, inverted, reconstruction: torch.Tensor, ratio: float) -> None:
    """The paper's premise on one record: DDIM inversion replayed at w = 7.5 with the plain null lands ≥ ``ratio``×
    farther from z*_0 (latent MSE) than the NTI reconstruction, which is the optimisation's own z̄_0."""
    from nti_lightning.api import ddim_baseline_latents

    z0 = inverted.pivot_z0[None]
    cfg = ddim_baseline_latents(model, [inverted], 7.5)
    mse_nti, mse_cfg = (reconstruction - z0).pow(2).mean().item(), (cfg - z0).pow(2).mean().item()
    assert mse_cfg / mse_nti >= ratio, (mse_cfg, mse_nti)
    assert torch.allclose(reconstruction[0], inverted.z_0, atol=1e-4)
