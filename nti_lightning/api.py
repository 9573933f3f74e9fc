"""Public Python API: ``invert`` images, ``reconstruct`` them.

``invert`` feeds the images to the continuous-batching engine (``slots.SlotEngine``), which runs Algorithm 1
of Mokady et al. (2023, ``algorithm.py``) — or another inverter, ``method=`` (``inverters.py``) — for each;
the dataset run behind ``nti invert`` (``run/``) drives the same engine over a stream with checkpoints and
outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from nti_lightning.config import InversionConfig, apply_overrides, resolve_batch_size
from nti_lightning.data.image import prepare_image, tensor_to_image
from nti_lightning.engine.ddim import schedule_from_scheduler
from nti_lightning.engine.runtime import Runtime
from nti_lightning.engine.sampling import ddim_sample, decode_latents
from nti_lightning.engine.slots import Admission, Failed, Finished, SlotEngine
from nti_lightning.engine.step_guidance import record_guidance
from nti_lightning.models.family import cat_cond
from nti_lightning.store.inversion import Inversion, validate_record
from nti_lightning.text import check_prompt


def image_size_for(model, cfg: InversionConfig) -> int:
    return cfg.image_size or model.native_image_size


def invert(
    model,
    images: Sequence | object,
    prompts: Sequence[str] | str,
    runtime: Runtime | None = None,
    **overrides,
) -> list[Inversion]:
    """Inverts ``images`` (PIL images, arrays or paths) with their ``prompts``; one ``Inversion`` per image, in
    order. ``method=`` "nti" (Null-text Inversion, the default), "ddim", "npi", "proxnpi" or "direct"
    (``InversionConfig.method``); every method gives the same record kind, with ``inv.method`` set.

    ``overrides`` are ``InversionConfig`` fields (method, num_ddim_steps, guidance_scale, num_inner_steps,
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
    admissions = [
        Admission(k, prepare_image(img, size, name=img if isinstance(img, str) else f"image {k}"), p)
        for k, (img, p) in enumerate(zip(images, prompts))
    ]
    rows = min(resolve_batch_size(cfg.batch_size, model.device), len(admissions))
    engine = SlotEngine(model, cfg, rows, runtime, image_size=size)
    out: dict[int, Inversion] = {}
    for event in engine.run(admissions):
        if isinstance(event, Failed):
            raise FloatingPointError(f"image {event.tag}: {event.error}")
        if isinstance(event, Finished):
            out[event.tag] = event.inversion
    return [out[k] for k in range(len(admissions))]


def reconstruction_latents(
    model, inversions: Sequence[Inversion], guidance_scale: float | None = None, runtime: Runtime | None = None
) -> torch.Tensor:
    """Samples z̄_0 from each inversion's z_T with its null embeddings (and its method's step guidance, e.g.
    Direct Inversion's corrections): → (B, C, h, w). The inversions must share one method's sampling."""
    runtime = runtime or Runtime()
    for k, inv in enumerate(inversions):
        validate_record(inv, model, label=f"inversion {k}")
    T = inversions[0].num_steps
    schedule = schedule_from_scheduler(model.scheduler, T)
    if not all(torch.equal(inv.timesteps, schedule.timesteps) for inv in inversions):
        raise ValueError("inversions were made with different timesteps than the model's scheduler gives")
    device = model.device
    z_T = torch.stack([inv.z_T for inv in inversions]).to(device)
    cond = inversions[0].sized_family(model).encode_prompts(model, [inv.prompt for inv in inversions])
    per_image = [inv.nulls(model) for inv in inversions]
    nulls = [cat_cond([n[i] for n in per_image]) for i in range(T)]
    w = guidance_scale if guidance_scale is not None else inversions[0].meta["hyperparameters"]["guidance_scale"]
    guidance = record_guidance(inversions, rows_per_image=1, edit=False)
    return ddim_sample(runtime.denoiser(model.unet, model.family), schedule, z_T, cond, nulls, w, guidance=guidance)


def reconstruct(model, inversion: Inversion, guidance_scale: float | None = None) -> Image.Image:
    """The reconstruction of one inversion (NTI's, or its method's) as a PIL image."""
    z0 = reconstruction_latents(model, [inversion], guidance_scale)
    return tensor_to_image(decode_latents(model, z0)[0])


def ddim_baseline_latents(
    model, inversions: Sequence[Inversion], guidance_scale: float, runtime: Runtime | None = None
) -> torch.Tensor:
    """DDIM inversion without NTI: sample from z*_T with the model's null at ``guidance_scale`` → (B, C, h, w).
    At w = 7.5 this is the failure NTI fixes; at w = 1 it stays close to the pivot."""
    runtime = runtime or Runtime()
    T = inversions[0].num_steps
    schedule = schedule_from_scheduler(model.scheduler, T)
    z_T = torch.stack([inv.pivot_zT for inv in inversions]).to(model.device)
    family = inversions[0].sized_family(model)  # SDXL: the time ids of the inverted size
    cond = family.encode_prompts(model, [inv.prompt for inv in inversions])
    null = family.null(model, len(inversions))
    return ddim_sample(runtime.denoiser(model.unet, model.family), schedule, z_T, cond, null, guidance_scale)
