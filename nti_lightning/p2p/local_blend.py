"""Local blend (Hertz et al. 2022, §3.2 "local editing"): confine each target's change to its words' region.

After each step the target latents outside a mask are replaced by the source latent. The mask comes from the
cross-attention of chosen words, accumulated by the controller's ``AttentionStore`` over the steps so far.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from nti_lightning.edit_config import EDIT_DEFAULTS
from nti_lightning.p2p.maps import map_shape, pick_attention_queries

if TYPE_CHECKING:
    from nti_lightning.p2p.controllers import AttentionStore

LOCAL_BLEND_POOL_FRACTION = 1 / 16
"""Max-pool radius as a fraction of the map side: the authors' radius 1 on SD's 16×16 maps."""


class LocalBlend:
    """Restricts each target's change to the region of chosen words (P2P §3.2, "local editing").

    After step i ≥ ⌊start·T⌋: the words' cross-attention, accumulated over the steps so far and averaged
    over layers and heads at the chosen map size, is max-pooled, upsampled (nearest) to the latent,
    max-normalised and thresholded; the union of the source words' and the target words' masks is the
    region where the target keeps its own latent — elsewhere it takes the source row's latent.

    source_words, target_words: (K, L) 0/1 token weights per target; a target whose rows are both zero is
    not blended. ``start`` and ``threshold`` default to ``EditConfig``'s.
    """

    def __init__(
        self,
        source_words: torch.Tensor,
        target_words: torch.Tensor,
        num_steps: int,
        start: float = EDIT_DEFAULTS.local_blend_start,
        threshold: float = EDIT_DEFAULTS.local_blend_threshold,
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
