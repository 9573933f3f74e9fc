"""Prompt-to-Prompt attention controllers (Hertz et al. 2022, §3.2), one call signature for all.

Every controller is called by ``attention.P2PAttnProcessor`` as ``controller(attn, is_cross, place_in_unet)``
with the maps of one attention layer, (2B·heads, queries, keys), and returns maps of the same shape. The
batch is [∅ rows | C rows] with B = 1 + K prompts per half: row 0 the source prompt P, rows 1…K the targets
P*_k. As the authors do, only the conditional half is edited; the ∅ half passes through untouched.

The step counter is driven by the sampler, not by counting layer calls: ``p2p.edit`` passes
``controller.step_callback(i, z)`` as ``ddim_sample``'s callback, which closes step i (accumulates the stored
maps, applies the local blend) and moves the controller to step i + 1. So a controller never needs to know
how many attention layers the UNet has.

Algorithm 1 of P2P per step t: M_t from the source row, M*_t from a target row, M̂_t = Edit(M_t, M*_t, t),
and the target row continues with M̂_t. The four edits:

- word swap (``AttentionReplace``): M̂ = M_t mapped onto the target's tokens, for t in the cross-replace window;
- adding a phrase (``AttentionRefine``): M̂_{:,j} = (M_t)_{:,A(j)} where A(j) exists, else (M*_t)_{:,j};
- re-weighting (``AttentionReweight``): M̂_{:,j*} = c · (M_t)_{:,j*} for the chosen tokens j*;
- local blend (``LocalBlend``): after each step, outside the region of chosen words (from their accumulated
  cross-attention) the target latent is set to the source latent.

Self-attention maps of the source are injected too (``self_replace_steps``), in layers whose number of
queries is at most ``self_replace_max_queries`` — the authors inject them at 32×32 and coarser of SD's 64×64
latents (≤ 1/4 of the latent's positions); ``edit`` derives the same fraction from the model's latent size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nti_lightning.p2p import alignment

StepWindow = float | tuple[float, float]
"""A fraction f of the steps (the first ⌊f·T⌋ steps) or a (start, end) pair of fractions."""

LOCAL_BLEND_START = 0.2
"""Fraction of the steps before the local blend starts (authors: ``start_blend=0.2``)."""
LOCAL_BLEND_THRESHOLD = 0.3
"""A latent position is inside the blend mask where the words' max-normalised map exceeds this (authors)."""
LOCAL_BLEND_POOL_FRACTION = 1 / 16
"""Max-pool radius as a fraction of the map side: the authors' radius 1 on SD's 16×16 maps."""


def step_range(window: StepWindow, num_steps: int) -> tuple[int, int]:
    """(start, end) step indices of a window: steps start ≤ i < end (P2P's τ as a fraction of T)."""
    start, end = (0.0, float(window)) if isinstance(window, (int, float)) else (float(window[0]), float(window[1]))
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"step window {window!r} must be a fraction in [0, 1] or a pair 0 ≤ start ≤ end ≤ 1")
    return int(start * num_steps + 1e-9), int(end * num_steps + 1e-9)


# ---------------------------------------------------------------------------------------------------------
# Base: split off the conditional half, count steps
# ---------------------------------------------------------------------------------------------------------


class AttentionControl:
    """Base controller: passes the ∅ half through, hands the conditional half to ``forward``.

    ``cur_step`` is the index of the sampling step being computed; ``step_callback`` advances it.
    """

    def __init__(self) -> None:
        self.cur_step = 0

    def forward(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        """attn: the conditional half (B·heads, queries, keys) → same shape."""
        return attn

    def __call__(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        half = attn.shape[0] // 2  # [∅ rows | C rows]
        edited = self.forward(attn[half:], is_cross, place_in_unet)
        if edited is attn[half:] or edited.data_ptr() == attn[half:].data_ptr():
            return attn
        return torch.cat([attn[:half], edited])  # (2B·heads, queries, keys)

    def between_steps(self) -> None:
        """Called once after all attention layers of a step have run."""

    def step_callback(self, step: int, z: torch.Tensor) -> torch.Tensor:
        """Closes step ``step`` (``ddim_sample`` callback): returns the latent to continue from."""
        self.between_steps()
        self.cur_step = step + 1
        return z

    def reset(self) -> None:
        self.cur_step = 0


class EmptyControl(AttentionControl):
    """Changes nothing: with it the P2P processor computes exactly what diffusers' ``AttnProcessor`` does."""


class AttentionStore(AttentionControl):
    """Records the conditional half's cross-attention maps, summed over steps, per (place, number of queries).

    Only cross-attention is kept (self-attention maps are never read back), and only in layers with at most
    ``max_queries`` queries (None: all) — the authors' memory guard. The stored maps are the ones the UNet
    used, i.e. after the controller's edit.
    """

    def __init__(self, max_queries: int | None = None) -> None:
        super().__init__()
        self.max_queries = max_queries
        self.step_store: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.attention_store: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.num_stored_steps = 0

    def store(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> None:
        queries = attn.shape[1]
        if is_cross and (self.max_queries is None or queries <= self.max_queries):
            self.step_store.setdefault((place_in_unet, queries), []).append(attn.detach().float())

    def forward(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        self.store(attn, is_cross, place_in_unet)
        return attn

    def between_steps(self) -> None:
        if not self.step_store:
            return
        if not self.attention_store:
            self.attention_store = self.step_store
        else:
            for key, maps in self.step_store.items():
                self.attention_store[key] = [a + b for a, b in zip(self.attention_store[key], maps)]
        self.num_stored_steps += 1
        self.step_store = {}

    def query_sizes(self) -> list[int]:
        return sorted({q for _, q in self.attention_store})

    def maps_at(self, queries: int, num_prompts: int) -> torch.Tensor:
        """Summed maps of all layers with ``queries`` queries: (B, layers·heads, queries, keys)."""
        maps = [m for (_, q), ms in self.attention_store.items() if q == queries for m in ms]
        if not maps:
            raise ValueError(f"no stored cross-attention maps with {queries} queries; have {self.query_sizes()}")
        return torch.cat([m.reshape(num_prompts, -1, *m.shape[1:]) for m in maps], dim=1)

    def average_attention(self, queries: int, num_prompts: int) -> torch.Tensor:
        """Cross-attention at one resolution averaged over steps, layers and heads: (B, queries, keys)."""
        return self.maps_at(queries, num_prompts).mean(1) / max(self.num_stored_steps, 1)

    def reset(self) -> None:
        super().reset()
        self.step_store, self.attention_store, self.num_stored_steps = {}, {}, 0


# ---------------------------------------------------------------------------------------------------------
# Map geometry (derived from the latent, never SD's 16×16 / 64×64)
# ---------------------------------------------------------------------------------------------------------


def map_shape(queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an attention map with ``queries`` positions over a latent of size ``latent_hw``."""
    h, w = latent_hw
    factor = math.sqrt(h * w / queries)
    mh, mw = round(h / factor), round(w / factor)
    if mh * mw != queries:
        raise ValueError(f"{queries} attention queries do not tile a {h}×{w} latent")
    return mh, mw


def pick_attention_queries(available: Sequence[int], latent_hw: tuple[int, int], side: int | None = None) -> int:
    """The map size (number of queries) used for local blend and attention figures.

    Default: the maps whose side is 1/4 of the latent's — the authors' 16×16 maps of SD's 64×64 latents
    (4×4 for the tiny model's 16×16 latents) — or, where the UNet has none of that size, the closest
    existing size (the finer one on a tie). ``side`` asks for a specific map side instead.
    """
    if not available:
        raise ValueError("no cross-attention maps were recorded")
    h, w = latent_hw
    wanted = (side * side * w // h) if side is not None else max(1, (h // 4) * (w // 4))
    if side is not None and wanted not in available:
        sides = [map_shape(q, latent_hw)[0] for q in available]
        raise ValueError(f"no cross-attention maps of side {side}; the model's are {sorted(set(sides))}")
    return min(available, key=lambda q: (abs(math.log(q / wanted)), -q))


# ---------------------------------------------------------------------------------------------------------
# Local blend
# ---------------------------------------------------------------------------------------------------------


class LocalBlend:
    """Restricts each target's change to the region of chosen words (P2P §3.2, "local editing").

    After step i ≥ ⌊start·T⌋: the words' cross-attention, accumulated over the steps so far and averaged
    over layers and heads at the chosen map size, is max-pooled, upsampled (nearest) to the latent,
    max-normalised and thresholded; the union of the source words' and the target words' masks is the
    region where the target keeps its own latent — elsewhere it takes the source row's latent.

    source_words, target_words: (K, L) 0/1 token weights per target; a target whose rows are both zero is
    not blended.
    """

    def __init__(
        self,
        source_words: torch.Tensor,
        target_words: torch.Tensor,
        num_steps: int,
        start: float = LOCAL_BLEND_START,
        threshold: float = LOCAL_BLEND_THRESHOLD,
        map_side: int | None = None,
    ) -> None:
        self.source_words = source_words.float()  # (K, L)
        self.target_words = target_words.float()  # (K, L)
        self.active = (self.source_words.sum(1) + self.target_words.sum(1)) > 0  # (K,)
        self.start_step = int(start * num_steps + 1e-9)
        self.threshold = threshold
        self.map_side = map_side
        self.last_mask: torch.Tensor | None = None  # (K, 1, h, w) bool, for inspection and tests

    def _mask(self, maps: torch.Tensor, words: torch.Tensor, map_hw: tuple[int, int], latent_hw) -> torch.Tensor:
        """maps (K, queries, L), words (K, L) → (K, 1, h, w) bool."""
        m = (maps * words[:, None, :].to(maps)).sum(-1)  # (K, queries)
        m = m.reshape(m.shape[0], 1, *map_hw)  # (K, 1, mh, mw)
        radius = round(max(map_hw) * LOCAL_BLEND_POOL_FRACTION)
        if radius > 0:
            m = F.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius)
        m = F.interpolate(m, size=latent_hw)  # nearest, (K, 1, h, w)
        m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
        return m > self.threshold

    def __call__(self, step: int, z: torch.Tensor, store: AttentionStore) -> torch.Tensor:
        """z: (1 + K, C, h, w) latents after step ``step`` → blended latents."""
        if step < self.start_step or not bool(self.active.any()):
            return z
        latent_hw = tuple(z.shape[-2:])
        queries = pick_attention_queries(store.query_sizes(), latent_hw, self.map_side)
        maps = store.average_attention(queries, z.shape[0])  # (1 + K, queries, L)
        k = z.shape[0] - 1
        map_hw = map_shape(queries, latent_hw)
        source = self._mask(maps[:1].expand(k, -1, -1), self.source_words, map_hw, latent_hw)
        target = self._mask(maps[1:], self.target_words, map_hw, latent_hw)
        mask = (source | target) | ~self.active.to(z.device)[:, None, None, None]  # (K, 1, h, w)
        self.last_mask = mask
        blended = torch.where(mask, z[1:], z[:1])  # outside the mask: the source latent, exactly
        return torch.cat([z[:1], blended])


# ---------------------------------------------------------------------------------------------------------
# The edit controller
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TargetEdit:
    """How one target prompt's attention is rewritten from the source's (one row of the batch)."""

    mapper: torch.Tensor  # (L, L): source token i → target token j weights (identity: same prompt)
    alphas: torch.Tensor  # (L,): 1 where target token j takes the mapped source map, 0 where it keeps its own
    equalizer: torch.Tensor  # (L,): re-weighting factor c per target token (1: unchanged)
    cross_replace: torch.Tensor  # (T, L): 1 where step i injects the source map into token j
    self_replace: tuple[int, int]  # steps start ≤ i < end inject the source's self-attention


class AttentionControlEdit(AttentionStore):
    """Applies ``TargetEdit`` rules to rows 1…K from row 0 (P2P Algorithm 1, lines 6–9), and the local blend.

    Rows may follow different rules, so several edits of one image (word swaps, refinements, re-weightings)
    share one sampling pass.
    """

    def __init__(
        self,
        edits: Sequence[TargetEdit],
        local_blend: LocalBlend | None = None,
        self_replace_max_queries: int | None = None,
        store_max_queries: int | None = None,
    ) -> None:
        super().__init__(store_max_queries)
        self.mapper = torch.stack([e.mapper for e in edits])  # (K, L, L)
        self.alphas = torch.stack([e.alphas for e in edits])  # (K, L)
        self.equalizer = torch.stack([e.equalizer for e in edits])  # (K, L)
        self.cross_replace = torch.stack([e.cross_replace for e in edits], dim=1)  # (T, K, L)
        self.self_replace = [e.self_replace for e in edits]
        self.local_blend = local_blend
        self.self_replace_max_queries = self_replace_max_queries

    @property
    def num_targets(self) -> int:
        return self.mapper.shape[0]

    def replace_cross_attention(self, attn_base: torch.Tensor, attn_replace: torch.Tensor) -> torch.Tensor:
        """Edit(M_t, M*_t) inside the window.

        attn_base: (heads, q, L) the source's maps M_t; attn_replace: (K, heads, q, L) the targets' M*_t.
        """
        mapper, alphas, equalizer = (x.to(attn_base) for x in (self.mapper, self.alphas, self.equalizer))
        mapped = torch.einsum("hqi,kij->khqj", attn_base, mapper)  # word swap / A(j): (K, heads, q, L)
        alphas = alphas[:, None, None, :]  # (K, 1, 1, L)
        refined = mapped * alphas + attn_replace * (1 - alphas)  # unaligned tokens keep M*_t
        return refined * equalizer[:, None, None, :]  # re-weighting: c · M at the chosen tokens

    def forward(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        num_prompts = 1 + self.num_targets
        heads = attn.shape[0] // num_prompts
        maps = attn.reshape(num_prompts, heads, *attn.shape[1:])  # (1 + K, heads, q, keys)
        base, own = maps[0], maps[1:]
        if is_cross:
            window = self.cross_replace[self.cur_step].to(attn)[:, None, None, :]  # (K, 1, 1, L)
            edited = self.replace_cross_attention(base, own) * window + own * (1 - window)
        else:
            if self.self_replace_max_queries is not None and attn.shape[1] > self.self_replace_max_queries:
                return attn
            inject = torch.tensor([s <= self.cur_step < e for s, e in self.self_replace], device=attn.device)
            if not bool(inject.any()):
                return attn
            edited = torch.where(inject[:, None, None, None], base.expand_as(own), own)  # (K, heads, q, q)
        out = torch.cat([base[None], edited]).reshape(attn.shape)  # (B·heads, q, keys)
        self.store(out, is_cross, place_in_unet)
        return out

    def step_callback(self, step: int, z: torch.Tensor) -> torch.Tensor:
        z = super().step_callback(step, z)
        if self.local_blend is not None:
            z = self.local_blend(step, z, self)
        return z


# ---------------------------------------------------------------------------------------------------------
# The rules: one TargetEdit per target prompt
# ---------------------------------------------------------------------------------------------------------


def cross_replace_schedule(
    tokenizer, target: str, num_steps: int, cross_replace_steps: StepWindow | dict[str, StepWindow]
) -> torch.Tensor:
    """(T, L) 0/1: step i injects the source map into target token j.

    ``cross_replace_steps`` is a window for all tokens, or a dict of windows: ``"default_"`` (all tokens;
    the whole run if absent, as the authors) and words of the target prompt with their own window.
    """
    max_len = tokenizer.model_max_length
    if not isinstance(cross_replace_steps, dict):
        cross_replace_steps = {"default_": cross_replace_steps}
    schedule = torch.zeros(num_steps, max_len)
    start, end = step_range(cross_replace_steps.get("default_", (0.0, 1.0)), num_steps)
    schedule[start:end] = 1.0
    for word, window in cross_replace_steps.items():
        if word == "default_":
            continue
        positions = alignment.word_token_indices(tokenizer, target, word)
        start, end = step_range(window, num_steps)
        schedule[:, positions] = 0.0
        schedule[start:end, positions] = 1.0
    return schedule


def reweight_equalizer(tokenizer, target: str, weights: dict[str, float] | None) -> torch.Tensor:
    """(L,) factors c for the target's tokens: each word's tokens get its scale, all others 1."""
    equalizer = torch.ones(tokenizer.model_max_length)
    for word, scale in (weights or {}).items():
        equalizer[alignment.word_token_indices(tokenizer, target, word)] = float(scale)
    return equalizer


def target_edit(
    tokenizer,
    source: str,
    target: str,
    mode: str,
    num_steps: int,
    cross_replace_steps: StepWindow | dict[str, StepWindow] = 0.8,
    self_replace_steps: StepWindow = 0.4,
    reweight: dict[str, float] | None = None,
) -> TargetEdit:
    """The rule for one target. mode: "replace" (word swap), "refine" (adding a phrase) or "reweight"
    (the target must then equal the source); ``reweight`` may accompany any mode (the authors' chained
    ``AttentionReweight(prev_controller=...)``)."""
    max_len = tokenizer.model_max_length
    if mode == "replace":
        mapper, alphas = alignment.replacement_mapper(tokenizer, source, target), torch.ones(max_len)
    elif mode == "refine":
        index, alphas = alignment.refinement_mapper(tokenizer, source, target)
        mapper = alignment.refinement_matrix(index, alphas)
    elif mode == "reweight":
        if alignment.prompt_words(tokenizer, source) != alignment.prompt_words(tokenizer, target):
            raise alignment.AlignmentError(
                f"mode 'reweight' re-weights the source prompt's own words; the target {target!r} differs from "
                f"the source {source!r}. Use mode 'replace' or 'refine' with reweight= to change words too."
            )
        if not reweight:
            raise ValueError("mode 'reweight' needs at least one WORD=SCALE")
        mapper, alphas = torch.eye(max_len), torch.ones(max_len)
    else:
        raise ValueError(f"unknown edit mode {mode!r}; choose replace, refine or reweight")
    return TargetEdit(
        mapper=mapper,
        alphas=alphas,
        equalizer=reweight_equalizer(tokenizer, target, reweight),
        cross_replace=cross_replace_schedule(tokenizer, target, num_steps, cross_replace_steps),
        self_replace=step_range(self_replace_steps, num_steps),
    )


def blend_word_weights(tokenizer, source: str, target: str, words: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """(L,) source and target 0/1 token weights for local-blend words; each word is looked up in both
    prompts and must occur in at least one."""
    max_len = tokenizer.model_max_length
    src, tgt = torch.zeros(max_len), torch.zeros(max_len)
    for word in words:
        hits = 0
        for prompt, weights in ((source, src), (target, tgt)):
            try:
                weights[alignment.word_token_indices(tokenizer, prompt, word)] = 1.0
                hits += 1
            except alignment.WordNotInPromptError:
                pass
        if not hits:
            raise alignment.WordNotInPromptError(
                f"blend word {word!r} is in neither the source prompt {source!r} nor the target {target!r}"
            )
    return src, tgt


# ---------------------------------------------------------------------------------------------------------
# The paper's controllers by name (one mode for all targets)
# ---------------------------------------------------------------------------------------------------------


class _SingleModeEdit(AttentionControlEdit):
    mode = ""

    def __init__(
        self,
        tokenizer,
        prompts: Sequence[str],
        num_steps: int,
        cross_replace_steps: StepWindow | dict[str, StepWindow] = 0.8,
        self_replace_steps: StepWindow = 0.4,
        local_blend: LocalBlend | None = None,
        reweight: dict[str, float] | None = None,
        self_replace_max_queries: int | None = None,
        store_max_queries: int | None = None,
    ) -> None:
        source, targets = prompts[0], prompts[1:]
        edits = [
            target_edit(tokenizer, source, t, self.mode, num_steps, cross_replace_steps, self_replace_steps, reweight)
            for t in targets
        ]
        super().__init__(edits, local_blend, self_replace_max_queries, store_max_queries)


class AttentionReplace(_SingleModeEdit):
    """Word swap (P2P §3.2): prompts [P, P*_1, …] with the same number of words."""

    mode = "replace"


class AttentionRefine(_SingleModeEdit):
    """Adding a phrase (P2P §3.2): each target contains the source's words in order."""

    mode = "refine"


class AttentionReweight(_SingleModeEdit):
    """Attention re-weighting (P2P §3.2): target = source, ``reweight={word: c}`` scales its maps by c."""

    mode = "reweight"
