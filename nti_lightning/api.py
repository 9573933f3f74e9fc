"""Public Python API: ``invert`` images, ``reconstruct`` them, and the batch engine both use.

The batch engine ``invert_batch`` is Algorithm 1 of Mokady et al. (2023) over B images, in numbered
steps: encode → embed text → DDIM-invert the pivot (w = 1) → null-text optimisation (w = 7.5) → records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
from PIL import Image

from nti_lightning import __version__
from nti_lightning.config import InversionConfig, apply_overrides
from nti_lightning.ddim import DDIMSchedule, schedule_from_scheduler
from nti_lightning.engine import ddim_inversion, ddim_sample, decode_latents, encode_latents
from nti_lightning.image import prepare_image, tensor_to_image
from nti_lightning.inversion import Inversion, check_compatible, scheduler_identity
from nti_lightning.nulltext import LoopState, NullTextInversionModule, optimize_null_text
from nti_lightning.runtime import Runtime, one_at_a_time
from nti_lightning.text import check_prompt, encode_null, encode_text


@dataclass
class PreparedBatch:
    """Everything fixed before the optimisation starts (deterministic: recomputed on resume)."""

    schedule: DDIMSchedule
    cond: torch.Tensor  # (B, L, D) ψ(prompts)
    null: torch.Tensor  # (B, L, D) ψ("")
    trajectory: torch.Tensor  # (T + 1, B, C, h, w) pivot, [0] = z*_0, [T] = z*_T


def image_size_for(model, cfg: InversionConfig) -> int:
    return cfg.image_size or model.native_image_size


def prepare_batch(model, pixels: torch.Tensor, prompts: list[str], cfg: InversionConfig, runtime: Runtime):
    """Steps 1–4 of Algorithm 1's set-up: z*_0, ψ(P), ψ(""), and the pivot trajectory z*_0 … z*_T."""
    # 1. Image → z*_0 (latent mean × scaling factor)
    encode = (
        one_at_a_time(lambda x: encode_latents(model, x)) if cfg.batch_invariant else partial(encode_latents, model)
    )
    z0 = encode(pixels)  # (B, 4, h, w)
    # 2. Text → C = ψ(P) and ∅ = ψ("")
    cond = torch.cat([encode_text(model, [p]) for p in prompts]) if cfg.batch_invariant else encode_text(model, prompts)
    cond = cond.to(z0.device)  # (B, L, D)
    null = encode_null(model, len(prompts)).to(z0.device)  # (B, L, D)
    # 3. The DDIM schedule (timesteps 981 … 1 for SD1.x, T = 50)
    schedule = schedule_from_scheduler(model.scheduler, cfg.num_ddim_steps)
    # 4. Pivot: DDIM inversion with w = 1 (Algorithm 1, lines 3–4)
    denoiser = runtime.denoiser(model.unet, per_sample=cfg.batch_invariant)
    trajectory = ddim_inversion(denoiser, schedule, z0, cond, cfg.pivot_guidance_scale, null)
    return PreparedBatch(schedule, cond, null, trajectory)


def invert_batch(
    model,
    pixels: torch.Tensor,
    prompts: list[str],
    cfg: InversionConfig,
    runtime: Runtime | None = None,
    *,
    prepared: PreparedBatch | None = None,
    module: NullTextInversionModule | None = None,
    state: LoopState | None = None,
    on_timestep_end: Callable[[LoopState], None] | None = None,
) -> tuple[list[Inversion | None], LoopState]:
    """Algorithm 1 for a batch. pixels: (B, 3, H, W) in [-1, 1]. Returns one ``Inversion`` per image
    (None where the loss or latent went non-finite: never a NaN result) and the final loop state.
    ``module``/``state`` resume an interrupted batch."""
    runtime = runtime or Runtime()
    pixels = pixels.to(model.device)
    prepared = prepared or prepare_batch(model, pixels, prompts, cfg, runtime)
    T = prepared.schedule.num_steps
    # 5. ∅_T ← ψ(""); the module's parameters are ∅_T … ∅_1 (Algorithm 1, line 6)
    module = module or NullTextInversionModule(prepared.null, T).to(pixels.device)
    # 6. Null-text optimisation, t = T → 1 (lines 7–12)
    state = optimize_null_text(
        module,
        runtime.denoiser(model.unet, per_sample=cfg.batch_invariant),
        prepared.schedule,
        prepared.trajectory,
        prepared.cond,
        cfg,
        runtime=runtime,
        state=state,
        on_timestep_end=on_timestep_end,
    )
    # 7. One record per image
    nulls = module.stacked().cpu()  # (T, B, L, D)
    meta = {
        "nti_lightning_version": __version__,
        "model_source": model.source,
        "model_fingerprint": model.fingerprint,
        "scheduler": scheduler_identity(model.scheduler),
        "hyperparameters": asdict(cfg),
        "image_size": int(pixels.shape[-1]),
        "precision": getattr(getattr(runtime.fabric, "_precision", None), "precision", "32-true"),
        "unet_calls": dict(state.unet_calls),
    }
    results: list[Inversion | None] = []
    for b, prompt in enumerate(prompts):
        ok = not bool(state.failed[b]) and bool(torch.isfinite(nulls[:, b]).all())
        results.append(
            Inversion(
                z_T=prepared.trajectory[T, b].cpu(),
                null_embeddings=nulls[:, b].clone(),
                timesteps=prepared.schedule.timesteps.cpu(),
                prompt=prompt,
                pivot_z0=prepared.trajectory[0, b].cpu(),
                pivot_zT=prepared.trajectory[T, b].cpu(),
                inner_steps=state.inner_steps[:, b].clone(),
                final_loss=state.final_loss[:, b].clone(),
                meta={**meta, "skipped_steps": int(state.skipped_steps[b])},
                z_0=state.z_bar[b].detach().cpu(),
            )
            if ok
            else None
        )
    return results, state


def invert(
    model,
    images: Sequence | object,
    prompts: Sequence[str] | str,
    runtime: Runtime | None = None,
    **overrides,
) -> list[Inversion]:
    """Null-text-inverts ``images`` (PIL images, arrays or paths) with their ``prompts``.

    ``overrides`` are ``InversionConfig`` fields (num_ddim_steps, guidance_scale, num_inner_steps,
    early_stop_epsilon, image_size, batch_size, …). Raises on bad input or a non-finite loss; the dataset
    runner (``nti invert``) records such images as failed and goes on instead.
    """
    cfg = apply_overrides(InversionConfig(), **overrides)
    if isinstance(images, (str, Image.Image)) or not isinstance(images, Sequence):
        images = [images]
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    size = image_size_for(model, cfg)
    for k, p in enumerate(prompts):
        check_prompt(model.tokenizer, p, label=f"prompt {k}")
    pixels = torch.stack([prepare_image(img, size, name=f"image {k}") for k, img in enumerate(images)])
    out: list[Inversion] = []
    for start in range(0, len(images), cfg.batch_size):
        sl = slice(start, start + cfg.batch_size)
        results, _ = invert_batch(model, pixels[sl], prompts[sl], cfg, runtime)
        for k, r in enumerate(results):
            if r is None:
                raise FloatingPointError(f"image {start + k}: non-finite loss or latent during null-text optimisation")
        out.extend(results)
    return out


def reconstruction_latents(
    model, inversions: Sequence[Inversion], guidance_scale: float | None = None, runtime: Runtime | None = None
) -> torch.Tensor:
    """Samples z̄_0 from each inversion's z_T with its null embeddings: → (B, C, h, w)."""
    runtime = runtime or Runtime()
    for inv in inversions:
        check_compatible(inv, model)
    T = inversions[0].num_steps
    schedule = schedule_from_scheduler(model.scheduler, T)
    if not all(torch.equal(inv.timesteps, schedule.timesteps) for inv in inversions):
        raise ValueError("inversions were made with different timesteps than the model's scheduler gives")
    device = model.device
    z_T = torch.stack([inv.z_T for inv in inversions]).to(device)
    cond = encode_text(model, [inv.prompt for inv in inversions]).to(device)
    nulls = torch.stack([inv.null_embeddings for inv in inversions], dim=1).to(device)  # (T, B, L, D)
    w = guidance_scale if guidance_scale is not None else inversions[0].meta["hyperparameters"]["guidance_scale"]
    return ddim_sample(runtime.denoiser(model.unet), schedule, z_T, cond, nulls, w)


def reconstruct(model, inversion: Inversion, guidance_scale: float | None = None) -> Image.Image:
    """The NTI reconstruction of one inversion as a PIL image."""
    z0 = reconstruction_latents(model, [inversion], guidance_scale)
    return tensor_to_image(decode_latents(model, z0)[0])


def ddim_baseline_latents(
    model, inversions: Sequence[Inversion], guidance_scale: float, runtime: Runtime | None = None
) -> torch.Tensor:
    """DDIM inversion without NTI: sample from z*_T with the plain ψ("") at ``guidance_scale`` → (B, C, h, w).
    At w = 7.5 this is the failure NTI fixes; at w = 1 it stays close to the pivot."""
    runtime = runtime or Runtime()
    T = inversions[0].num_steps
    schedule = schedule_from_scheduler(model.scheduler, T)
    device = model.device
    z_T = torch.stack([inv.pivot_zT for inv in inversions]).to(device)
    cond = encode_text(model, [inv.prompt for inv in inversions]).to(device)
    null = encode_null(model, len(inversions)).to(device)
    return ddim_sample(runtime.denoiser(model.unet), schedule, z_T, cond, null, guidance_scale)
