"""Prompt-to-Prompt editing of a Null-text inversion (Mokady et al. 2023 §4.2; Hertz et al. 2022 Algorithm 1).

The inversion's z̄_T and per-timestep null embeddings ∅_t reconstruct the image under the source prompt P.
Editing samples one batch [P, P*_1, …, P*_K] from the same z̄_T with the same ∅_t for every row, through
``engine.ddim_sample`` (one UNet call per step on [∅ rows | C rows]), while a controller rewrites the targets'
attention from the source's. Row 0 is therefore the NTI reconstruction itself, and each row k ≥ 1 an edit.

With every target equal to the source and nothing to control, no processor is installed and the edit is the
reconstruction sampled at batch size 1 + K, bit for bit (``api.reconstruction_latents`` of the inversion
repeated 1 + K times). With a controller the UNet's attention runs through ``P2PAttnProcessor`` (explicit
softmax), which differs from diffusers' default fused attention by float rounding (~1e-6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from nti_lightning.ddim import schedule_from_scheduler
from nti_lightning.edit_args import CROSS_REPLACE_STEPS, MODES, SELF_REPLACE_STEPS  # noqa: E402,F401
from nti_lightning.image import ImageError, prepare_image, tensor_to_image
from nti_lightning.inversion import Inversion, check_compatible
from nti_lightning.p2p import alignment
from nti_lightning.p2p.attention import attention_control
from nti_lightning.p2p.controllers import (
    LOCAL_BLEND_START,
    LOCAL_BLEND_THRESHOLD,
    AttentionControl,
    AttentionControlEdit,
    AttentionStore,
    LocalBlend,
    StepWindow,
    TargetEdit,
    blend_word_weights,
    map_shape,
    pick_attention_queries,
    step_range,
    target_edit,
)
from nti_lightning.runtime import Runtime
from nti_lightning.sampling import ddim_sample, decode_latents
from nti_lightning.text import check_prompt

DEFAULT_GUIDANCE_SCALE = 7.5
"""Used only when the inversion does not record the guidance scale it was optimised for."""
ATTENTION_TILE = 128
"""Pixel size of one token's tile in the attention figure (the coarse map is upsampled bicubically)."""


@dataclass
class EditSpec:
    """One target prompt and how to edit towards it (see ``edit`` for the fields)."""

    target: str
    mode: str | None = None
    cross_replace_steps: StepWindow | dict[str, StepWindow] = CROSS_REPLACE_STEPS
    self_replace_steps: StepWindow = SELF_REPLACE_STEPS
    blend_words: Sequence[str] | None = None
    reweight: dict[str, float] | None = None


@dataclass
class EditResult:
    """Rows: 0 = the source branch (the NTI reconstruction), 1…K = the edits, in the order given."""

    source_prompt: str
    target_prompts: list[str]
    modes: list[str | None]
    latents: torch.Tensor  # (1 + K, C, h, w)
    images: list[Image.Image]  # 1 + K
    attention: torch.Tensor | None = None  # (1 + K, mh, mw, L): cross-attention averaged over steps/layers/heads
    token_labels: list[list[str]] = field(default_factory=list)  # per row, one label per used token position
    blend_mask: torch.Tensor | None = None  # (K, 1, h, w) bool: the last local-blend mask

    @property
    def reconstruction(self) -> Image.Image:
        return self.images[0]

    @property
    def edited(self) -> Image.Image:
        """The first (for ``edit``: the only) edit."""
        return self.images[1]

    def attention_image(self, k: int = 1) -> Image.Image:
        """Figure 4 of P2P for edit k: the source's token maps (top row) and target k's (bottom row)."""
        if self.attention is None:
            raise ValueError("no attention maps recorded; call edit(..., return_attention=True)")
        return attention_figure(self.attention[[0, k]], [self.token_labels[0], self.token_labels[k]])


# ---------------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------------


def resolve_mode(tokenizer, source: str, spec: EditSpec) -> str | None:
    """The spec's mode, or inferred: same prompt → "reweight" if re-weighting else None (nothing to edit);
    same number of words → "replace"; otherwise "refine"."""
    if spec.mode is not None:
        if spec.mode not in MODES:
            raise ValueError(f"unknown edit mode {spec.mode!r}; choose one of {', '.join(MODES)}")
        return spec.mode
    ws, wt = alignment.prompt_words(tokenizer, source), alignment.prompt_words(tokenizer, spec.target)
    if ws == wt:
        return "reweight" if spec.reweight else None
    return "replace" if len(ws) == len(wt) else "refine"


def identity_edit(max_len: int, num_steps: int) -> TargetEdit:
    """A target that keeps its own attention everywhere."""
    return TargetEdit(
        torch.eye(max_len), torch.ones(max_len), torch.ones(max_len), torch.zeros(num_steps, max_len), (0, 0)
    )


def build_controller(
    tokenizer,
    source: str,
    specs: Sequence[EditSpec],
    num_steps: int,
    latent_hw: tuple[int, int],
    return_attention: bool = False,
    local_blend_start: float = LOCAL_BLEND_START,
    local_blend_threshold: float = LOCAL_BLEND_THRESHOLD,
    attention_side: int | None = None,
) -> tuple[AttentionControl | None, list[str | None]]:
    """One controller for the batch [source, *targets] (None when there is nothing to control) and the modes.

    Raises ``AlignmentError`` / ``WordNotInPromptError`` / ``ValueError`` for a spec that cannot be applied.
    """
    max_len = tokenizer.model_max_length
    modes = [resolve_mode(tokenizer, source, s) for s in specs]
    edits = [
        target_edit(tokenizer, source, s.target, m, num_steps, s.cross_replace_steps, s.self_replace_steps, s.reweight)
        if m is not None
        else identity_edit(max_len, num_steps)
        for s, m in zip(specs, modes)
    ]
    blends = [
        blend_word_weights(tokenizer, source, s.target, s.blend_words) if s.blend_words else (torch.zeros(max_len),) * 2
        for s in specs
    ]
    for s in specs:
        step_range(s.self_replace_steps, num_steps)  # validates the window even where it is unused
    quarter = (latent_hw[0] * latent_hw[1]) // 4  # the authors' 32² of 64² latents: all but the finest maps
    store = quarter if attention_side is None else max(quarter, attention_side**2 * latent_hw[1] // latent_hw[0])
    local_blend = None
    if any(s.blend_words for s in specs):
        src, tgt = torch.stack([b[0] for b in blends]), torch.stack([b[1] for b in blends])
        local_blend = LocalBlend(src, tgt, num_steps, local_blend_start, local_blend_threshold, attention_side)
    if any(m is not None for m in modes) or local_blend is not None:
        return AttentionControlEdit(edits, local_blend, quarter, store), modes
    if return_attention:
        return AttentionStore(store), modes
    return None, modes


# ---------------------------------------------------------------------------------------------------------
# Editing
# ---------------------------------------------------------------------------------------------------------


def default_guidance_scale(inversion: Inversion) -> float:
    return float(inversion.meta.get("hyperparameters", {}).get("guidance_scale", DEFAULT_GUIDANCE_SCALE))


def edit_batch(
    model,
    inversion: Inversion,
    specs: Sequence[EditSpec],
    guidance_scale: float | None = None,
    return_attention: bool = False,
    runtime: Runtime | None = None,
    attention_side: int | None = None,
    local_blend_start: float = LOCAL_BLEND_START,
    local_blend_threshold: float = LOCAL_BLEND_THRESHOLD,
) -> EditResult:
    """K edits of one inversion in one sampling pass: batch [P, P*_1, …, P*_K] (P2P Algorithm 1)."""
    runtime = runtime or Runtime()
    # 1. Check inputs: the model that made the inversion, its timesteps, the prompts
    check_compatible(inversion, model)
    if not specs:
        raise ValueError("no edits given")
    schedule = schedule_from_scheduler(model.scheduler, inversion.num_steps)
    if not torch.equal(inversion.timesteps, schedule.timesteps):
        raise ValueError("the inversion was made with other timesteps than the model's scheduler gives")
    source = inversion.prompt
    T = schedule.num_steps
    targets = [check_prompt(model.tokenizer, s.target, label=f"target prompt {k + 1}") for k, s in enumerate(specs)]
    prompts = [source, *targets]
    B = len(prompts)
    # 2. The controller: one rule per target, the local blend, the attention store
    latent_hw = tuple(inversion.z_T.shape[-2:])
    controller, modes = build_controller(
        model.tokenizer,
        source,
        specs,
        schedule.num_steps,
        latent_hw,
        return_attention,
        local_blend_start,
        local_blend_threshold,
        attention_side,
    )
    # 3. Sample all rows from z̄_T with the inversion's ∅_t (Algorithm 1 of P2P, z*_T ← z_T)
    device = model.device
    z_T = inversion.z_T[None].expand(B, -1, -1, -1).to(device)  # (B, C, h, w)
    cond = model.family.encode_prompts(model, prompts)  # {key: (B, …)}
    nulls = [{k: v.expand(B, *v.shape[1:]) for k, v in inversion.null(i, model).items()} for i in range(T)]
    w = guidance_scale if guidance_scale is not None else default_guidance_scale(inversion)
    callback = controller.step_callback if controller is not None else None
    with attention_control(model.unet, controller):
        z0 = ddim_sample(
            runtime.denoiser(model.unet, model.family), schedule, z_T, cond, nulls, w, callback
        )  # (B, C, h, w)
    # 4. Decode; collect the attention maps
    pixels = decode_latents(model, z0).cpu()
    result = EditResult(source, targets, modes, z0.cpu(), [tensor_to_image(x) for x in pixels])
    if isinstance(controller, AttentionControlEdit) and controller.local_blend is not None:
        result.blend_mask = controller.local_blend.last_mask
    if return_attention and isinstance(controller, AttentionStore):
        queries = pick_attention_queries(controller.query_sizes(), latent_hw, attention_side)
        maps = controller.average_attention(queries, B)  # (B, queries, L)
        result.attention = maps.reshape(B, *map_shape(queries, latent_hw), -1).cpu()  # (B, mh, mw, L)
        result.token_labels = [alignment.token_labels(model.tokenizer, p) for p in prompts]
    return result


def edit(
    model,
    inversion: Inversion,
    target_prompt: str,
    mode: str | None = None,
    cross_replace_steps: StepWindow | dict[str, StepWindow] = CROSS_REPLACE_STEPS,
    self_replace_steps: StepWindow = SELF_REPLACE_STEPS,
    blend_words: Sequence[str] | None = None,
    reweight: dict[str, float] | None = None,
    guidance_scale: float | None = None,
    return_attention: bool = False,
    **kwargs,
) -> EditResult:
    """Edits an inverted image towards ``target_prompt`` with Prompt-to-Prompt.

    mode: "replace" (word swap: same number of words), "refine" (adding words), "reweight" (target = source,
        with ``reweight``); None infers it from the prompts.
    cross_replace_steps: fraction of the steps (or (start, end), or {"default_": …, word: …}) in which the
        source's cross-attention is injected.
    self_replace_steps: fraction of the steps (or (start, end)) in which its self-attention is injected.
    blend_words: local blend — restrict the change to the region of these words (looked up in both prompts).
    reweight: {word: c} scales the target word's attention by c (P2P's equalizer); combines with any mode.
    guidance_scale: default: the one the inversion was optimised for.
    return_attention: also return the cross-attention maps averaged over steps (``result.attention_image()``).
    kwargs: ``runtime``, ``attention_side``, ``local_blend_start``, ``local_blend_threshold`` of ``edit_batch``.

    Returns an ``EditResult``: ``.images[0]`` the reconstruction, ``.images[1]`` (``.edited``) the edit.
    """
    blend = [blend_words] if isinstance(blend_words, str) else blend_words
    spec = EditSpec(target_prompt, mode, cross_replace_steps, self_replace_steps, blend, reweight)
    return edit_batch(model, inversion, [spec], guidance_scale, return_attention, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------


def input_image(model, inversion: Inversion) -> Image.Image:
    """The inverted image: the source file recorded by ``nti invert`` (prepared as it was inverted) if it is
    still there, else the VAE decoding of the pivot z*_0 (what the inversion actually saw)."""
    source = (inversion.meta.get("image") or {}).get("source")
    size = inversion.meta.get("image_size") or inversion.z_T.shape[-1] * model.vae_scale_factor
    if source and Path(source).is_file():
        try:
            return tensor_to_image(prepare_image(source, int(size)))
        except ImageError:
            pass
    return tensor_to_image(decode_latents(model, inversion.pivot_z0[None].to(model.device))[0])


def edit_strip(model, inversion: Inversion, result: EditResult, k: int = 1) -> Image.Image:
    """input | reconstruction | edit k, side by side."""
    from nti_lightning.metrics import make_strip  # torchmetrics: imported only when pictures are made

    return make_strip([input_image(model, inversion), result.images[0], result.images[k]])


def attention_figure(maps: torch.Tensor, labels: Sequence[Sequence[str]], tile: int = ATTENTION_TILE) -> Image.Image:
    """One row per prompt, one tile per used token: its map (min–max normalised, upsampled) over its label.

    maps: (rows, mh, mw, L); labels: per row, one label per used token position (start … end).
    """
    font = ImageFont.load_default()
    text_h = 16
    cols = max(len(r) for r in labels)
    canvas = Image.new("RGB", (cols * (tile + 4), len(labels) * (tile + text_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row_labels in enumerate(labels):
        for j, label in enumerate(row_labels):
            m = maps[r, :, :, j].float()
            m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)  # min–max: flat maps of a small model show
            m = (255 * m).round().clamp(0, 255).to(torch.uint8).numpy()
            img = Image.fromarray(m, mode="L").resize((tile, tile), Image.Resampling.BICUBIC).convert("RGB")
            x, y = j * (tile + 4), r * (tile + text_h + 4)
            canvas.paste(img, (x, y))
            draw.text((x + 2, y + tile + 2), label[:18], fill="black", font=font)
    return canvas
