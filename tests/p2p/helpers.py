"""Helpers of the Prompt-to-Prompt tests: an inversion-shaped record, a recording controller, the edit's
sampling loop with an explicit controller. Random weights make no sense of images, so tests check equalities."""

from __future__ import annotations

import torch

from nti_lightning.engine.ddim import schedule_from_scheduler
from nti_lightning.engine.sampling import ddim_sample, unet_denoiser
from nti_lightning.p2p import attention_control
from nti_lightning.store.inversion import Inversion, scheduler_identity
from nti_lightning.text import encode_null, encode_text

T = 4  # DDIM steps
SOURCE = "a cat sitting next to a mirror"
DOG = "a dog sitting next to a mirror"


def make_inversion(model, prompt: str = SOURCE, side: int = 8, seed: int = 0) -> Inversion:
    """An inversion-shaped record: random z_T, per-step null embeddings near ψ(""), the model's identity and
    scheduler (``validate_record`` refuses a record without them)."""
    g = torch.Generator().manual_seed(seed)
    schedule = schedule_from_scheduler(model.scheduler, T)
    null = encode_null(model, 1)[0]  # (L, D)
    return Inversion(
        z_T=torch.randn(4, side, side, generator=g),
        null_embeddings=null[None].repeat(T, 1, 1) + 0.01 * torch.randn(T, *null.shape, generator=g),
        timesteps=schedule.timesteps,
        prompt=prompt,
        pivot_z0=torch.randn(4, side, side, generator=g),
        pivot_zT=torch.zeros(4, side, side),
        inner_steps=torch.zeros(T, dtype=torch.long),
        final_loss=torch.zeros(T),
        meta={
            "model_source": model.source,
            "model_fingerprint": model.fingerprint,
            "scheduler": scheduler_identity(model.scheduler),
            "hyperparameters": {"guidance_scale": 7.5},
            "image_size": side * model.vae_scale_factor,
        },
    )


def n_tokens(tok, word: str) -> int:
    return len(tok(word, add_special_tokens=False).input_ids)


class Recorder:
    """Wraps a controller; keeps (is_cross, place, maps in, maps out) of every attention call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, attn, is_cross, place):
        out = self.inner(attn, is_cross, place)
        self.calls.append((is_cross, place, attn.clone(), out.clone()))
        return out

    def step_callback(self, step, z):
        return self.inner.step_callback(step, z)


@torch.no_grad()
def sample_with(model, inv, prompts, controller, w=7.5):
    """The edit's sampling loop with an explicit controller (as ``edit_batch`` step 3)."""
    schedule = schedule_from_scheduler(model.scheduler, T)
    B = len(prompts)
    z_T = inv.z_T[None].expand(B, -1, -1, -1)
    nulls = [{"prompt_embeds": inv.null_embeddings[i][None].expand(B, -1, -1)} for i in range(T)]
    cond = {"prompt_embeds": encode_text(model, prompts)}
    with attention_control(model.unet, controller):
        return ddim_sample(
            unet_denoiser(model.unet, model.family), schedule, z_T, cond, nulls, w, controller.step_callback
        )


def unet_inputs(B=2, side=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, side, side, generator=g), torch.tensor(981), torch.randn(B, 77, 32, generator=g)
