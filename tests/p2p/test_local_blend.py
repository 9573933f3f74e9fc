"""``p2p.local_blend``: outside the words' region the edit keeps the source latent exactly (P2P §3.2)."""

from __future__ import annotations

import torch

from nti_lightning.p2p import edit

from .helpers import DOG


def test_local_blend_keeps_the_source_outside_the_mask(model, inv):
    result = edit(
        model,
        inv,
        DOG,
        blend_words=["cat", "dog"],
        local_blend_threshold=0.99,  # random maps are nearly flat: keep only the peak so the mask is partial
        local_blend_start=0.0,
    )
    mask = result.blend_mask[0, 0]  # (h, w)
    assert mask.shape == (8, 8) and mask.any() and not mask.all()
    outside = ~mask
    assert torch.equal(result.latents[1][:, outside], result.latents[0][:, outside])
    assert not torch.equal(result.latents[1][:, mask], result.latents[0][:, mask])


def test_local_blend_waits_for_its_start(model, inv):
    """Before ⌊start·T⌋ steps no mask is made; with start = 1 the blend never acts and the edit is unblended."""
    late = edit(model, inv, DOG, blend_words=["cat", "dog"], local_blend_threshold=0.99, local_blend_start=1.0)
    plain = edit(model, inv, DOG)
    assert late.blend_mask is None
    assert torch.equal(late.latents, plain.latents)
