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
and the target row continues with M̂_t. The rules Edit(·) — word swap, adding a phrase, re-weighting — are
built per target by ``rules.py`` (``TargetEdit``); the local blend lives in ``local_blend.py``.

Self-attention maps of the source are injected too (``self_replace_steps``), in layers whose number of
queries is at most ``self_replace_max_queries`` — the authors inject them at 32×32 and coarser of SD's 64×64
latents (≤ 1/4 of the latent's positions, ``maps.coarse_queries``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nti_lightning.edit_config import EDIT_DEFAULTS, CrossReplace, StepWindow
from nti_lightning.p2p.local_blend import LocalBlend
from nti_lightning.p2p.maps import coarse_queries, store_queries
from nti_lightning.p2p.rules import TargetEdit, target_edit

# ---------------------------------------------------------------------------------------------------------
# Base: split off the conditional half, count steps; the store
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
# The edit controller
# ---------------------------------------------------------------------------------------------------------


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
# The paper's controllers by name (one mode for all targets)
# ---------------------------------------------------------------------------------------------------------


class _SingleModeEdit(AttentionControlEdit):
    """[source, *targets] all edited with the class's mode. With ``latent_hw`` (the latent's (h, w)) the
    self-attention injection and the store are limited as ``p2p.edit`` limits them (``maps.coarse_queries``),
    so the controller equals the one ``edit`` builds for the same prompts and windows."""

    mode = ""

    def __init__(
        self,
        tokenizer,
        prompts: Sequence[str],
        num_steps: int,
        cross_replace_steps: CrossReplace = EDIT_DEFAULTS.cross_replace,
        self_replace_steps: StepWindow = EDIT_DEFAULTS.self_replace,
        local_blend: LocalBlend | None = None,
        reweight: dict[str, float] | None = None,
        self_replace_max_queries: int | None = None,
        store_max_queries: int | None = None,
        latent_hw: tuple[int, int] | None = None,
    ) -> None:
        source, targets = prompts[0], prompts[1:]
        edits = [
            target_edit(tokenizer, source, t, self.mode, num_steps, cross_replace_steps, self_replace_steps, reweight)
            for t in targets
        ]
        if latent_hw is not None:
            if self_replace_max_queries is None:
                self_replace_max_queries = coarse_queries(latent_hw)
            if store_max_queries is None:
                store_max_queries = store_queries(latent_hw)
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
