"""Prompt-to-Prompt editing of a Null-text inversion (Mokady et al. 2023 §4.2; Hertz et al. 2022 Algorithm 1).

The inversion's z̄_T and per-timestep null embeddings ∅_t reconstruct the image under the source prompt P.
Editing samples one batch [P, P*_1, …, P*_K] from the same z̄_T with the same ∅_t for every row, through
``sampling.ddim_sample`` (one UNet call per step on [∅ rows | C rows]), while a controller rewrites the targets'
attention from the source's. Row 0 is therefore the NTI reconstruction itself, and each row k ≥ 1 an edit.

With every target equal to the source and nothing to control, no processor is installed and the edit is the
reconstruction sampled at batch size 1 + K, bit for bit (``api.reconstruction_latents`` of the inversion
repeated 1 + K times). With a controller the UNet's attention runs through ``P2PAttnProcessor`` (explicit
softmax), which differs from diffusers' default fused attention by float rounding (~1e-6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from nti_lightning.config import InversionConfig
from nti_lightning.data.image import tensor_to_image
from nti_lightning.edit_config import EDIT_DEFAULTS, EDIT_MODES, CrossReplace, StepWindow
from nti_lightning.engine.ddim import schedule_from_scheduler
from nti_lightning.engine.runtime import Runtime
from nti_lightning.engine.sampling import ddim_sample, decode_latents
from nti_lightning.engine.step_guidance import record_guidance
from nti_lightning.p2p import alignment
from nti_lightning.p2p.attention import attention_control
from nti_lightning.p2p.controllers import AttentionControl, AttentionControlEdit, AttentionStore
from nti_lightning.p2p.figures import attention_figure
from nti_lightning.p2p.local_blend import LocalBlend
from nti_lightning.p2p.maps import coarse_queries, map_shape, pick_attention_queries, store_queries
from nti_lightning.p2p.rules import blend_word_weights, identity_edit, step_range, target_edit
from nti_lightning.store.inversion import Inversion, validate_record
from nti_lightning.text import check_prompt


@dataclass
class EditSpec:
    """One target prompt and how to edit towards it (see ``edit`` for the fields)."""

    target: str
    mode: str | None = None
    cross_replace_steps: CrossReplace = EDIT_DEFAULTS.cross_replace
    self_replace_steps: StepWindow = EDIT_DEFAULTS.self_replace
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
    guidance_scale: float | None = None  # w the edits were sampled with

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
    """The spec's mode, or inferred: the same prompt (the same tokens) → "reweight" if re-weighting else None
    (nothing to edit); same number of words → "replace"; otherwise "refine"."""
    if spec.mode is not None:
        if spec.mode not in EDIT_MODES:
            raise ValueError(f"unknown edit mode {spec.mode!r}; choose one of {', '.join(EDIT_MODES)}")
        return spec.mode
    ws, wt = alignment.prompt_words(tokenizer, source), alignment.prompt_words(tokenizer, spec.target)
    if alignment.same_prompt(tokenizer, source, spec.target):
        return "reweight" if spec.reweight else None
    return "replace" if len(ws) == len(wt) else "refine"


def build_controller(
    tokenizer,
    source: str,
    specs: Sequence[EditSpec],
    num_steps: int,
    latent_hw: tuple[int, int],
    return_attention: bool = False,
    local_blend_start: float = EDIT_DEFAULTS.local_blend_start,
    local_blend_threshold: float = EDIT_DEFAULTS.local_blend_threshold,
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
    quarter, store = coarse_queries(latent_hw), store_queries(latent_hw, attention_side)
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
    """The w the inversion's null embeddings were optimised for (``InversionConfig``'s default for an inversion
    that records none): ∅_t reconstructs the image only under that w (Mokady et al. 2023 §3.2)."""
    recorded = inversion.meta.get("hyperparameters", {}).get("guidance_scale")
    return float(recorded if recorded is not None else InversionConfig.guidance_scale)


def edit_batch(
    model,
    inversion: Inversion,
    specs: Sequence[EditSpec],
    guidance_scale: float | None = None,
    return_attention: bool = False,
    runtime: Runtime | None = None,
    attention_side: int | None = None,
    local_blend_start: float = EDIT_DEFAULTS.local_blend_start,
    local_blend_threshold: float = EDIT_DEFAULTS.local_blend_threshold,
) -> EditResult:
    """K edits of one inversion in one sampling pass: batch [P, P*_1, …, P*_K] (P2P Algorithm 1)."""
    runtime = runtime or Runtime()
    # 1. Check inputs: the model that made the inversion, its timesteps, the prompts
    validate_record(inversion, model)
    if not specs:
        raise ValueError("no edits given")
    schedule = schedule_from_scheduler(model.scheduler, inversion.num_steps)
    if not torch.equal(inversion.timesteps, schedule.timesteps):
        raise ValueError("the inversion was made with other timesteps than the model's scheduler gives")
    source = inversion.prompt
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
    cond = inversion.sized_family(model).encode_prompts(model, prompts)  # {key: (B, …)}
    nulls = [{k: v.expand(B, *v.shape[1:]) for k, v in null.items()} for null in inversion.nulls(model)]
    w = guidance_scale if guidance_scale is not None else default_guidance_scale(inversion)
    callback = controller.step_callback if controller is not None else None
    guidance = record_guidance([inversion], rows_per_image=B, edit=True)  # the record's method: proxnpi, direct
    with attention_control(model.unet, controller):
        z0 = ddim_sample(
            runtime.denoiser(model.unet, model.family), schedule, z_T, cond, nulls, w, callback, guidance
        )  # (B, C, h, w)
    # 4. Decode; collect the attention maps
    pixels = decode_latents(model, z0).cpu()
    result = EditResult(source, targets, modes, z0.cpu(), [tensor_to_image(x) for x in pixels], guidance_scale=w)
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
    cross_replace_steps: CrossReplace = EDIT_DEFAULTS.cross_replace,
    self_replace_steps: StepWindow = EDIT_DEFAULTS.self_replace,
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
