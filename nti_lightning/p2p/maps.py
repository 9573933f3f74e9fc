"""Attention-map geometry, derived from the latent (never SD's hard-coded 16×16 / 64×64).

A map with q queries covers the latent at a coarser resolution: (h/f, w/f) with f = √(hw/q). Prompt-to-Prompt
reads its maps at one resolution (local blend, attention figures) and injects self-attention only in the
coarser layers; both choices are written here, as fractions of the latent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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


def coarse_queries(latent_hw: tuple[int, int]) -> int:
    """Most queries of a layer whose self-attention is injected and whose cross-attention is stored: ¼ of the
    latent's positions — the authors' 32×32 and coarser of SD's 64×64 latents (all but the finest layers)."""
    return (latent_hw[0] * latent_hw[1]) // 4


def store_queries(latent_hw: tuple[int, int], attention_side: int | None = None) -> int:
    """Most queries of a layer whose cross-attention maps are stored: ``coarse_queries``, or more where a
    finer ``attention_side`` is asked for."""
    quarter = coarse_queries(latent_hw)
    if attention_side is None:
        return quarter
    return max(quarter, attention_side**2 * latent_hw[1] // latent_hw[0])
