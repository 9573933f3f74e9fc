"""``p2p.controllers``: the edit controller applies each target's rule (P2P Algorithm 1), the per-mode
controllers of the public API equal the generic path ``edit`` takes."""

from __future__ import annotations

import pytest
import torch

from nti_lightning.p2p import AttentionRefine, AttentionReplace, AttentionReweight, EditSpec, edit
from nti_lightning.p2p import alignment as al
from nti_lightning.p2p.edit import build_controller

from .helpers import DOG, SOURCE, Recorder, T, sample_with


def test_reweight_scales_exactly_the_chosen_columns(tok):
    ctrl = AttentionReweight(tok, [SOURCE, SOURCE], T, cross_replace_steps=1.0, reweight={"cat": 3.0, "mirror": 0.5})
    heads, q = 4, 16
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(2 * 2 * heads, q, 77, generator=g).softmax(-1)  # [∅ src, ∅ tgt, C src, C tgt]
    out = ctrl(attn, True, "down")
    assert torch.equal(out[: 2 * heads], attn[: 2 * heads])  # ∅ half untouched
    assert torch.equal(out[2 * heads : 3 * heads], attn[2 * heads : 3 * heads])  # source row untouched
    base, tgt = attn[2 * heads : 3 * heads], out[3 * heads :]
    cat, mirror = al.word_token_indices(tok, SOURCE, "cat"), al.word_token_indices(tok, SOURCE, "mirror")
    others = [j for j in range(77) if j not in cat + mirror]
    assert torch.equal(tgt[..., cat], base[..., cat] * 3.0)
    assert torch.equal(tgt[..., mirror], base[..., mirror] * 0.5)
    assert torch.equal(tgt[..., others], base[..., others])


@torch.no_grad()
def test_replace_over_all_steps_injects_the_source_maps(model, inv, tok):
    target = "a dog sitting next to a mirror"
    controller, modes = build_controller(tok, SOURCE, [EditSpec(target, "replace", 1.0, 1.0)], T, (8, 8))
    assert modes == ["replace"]
    rec = Recorder(controller)
    sample_with(model, inv, [SOURCE, target], rec)
    heads = model.unet.config.attention_head_dim
    assert len(rec.calls) == T * len(model.unet.attn_processors)
    quarter = 8 * 8 // 4
    n_self_checked = 0
    for is_cross, _, attn_in, out in rec.calls:
        src_out, tgt_out = out[2 * heads : 3 * heads], out[3 * heads :]
        assert torch.equal(out[: 2 * heads], attn_in[: 2 * heads])  # ∅ half untouched
        assert torch.equal(src_out, attn_in[2 * heads : 3 * heads])  # the source is never edited
        if is_cross or attn_in.shape[1] <= quarter:
            assert torch.equal(tgt_out, src_out)  # injected: the target uses the source's maps
            n_self_checked += not is_cross
        else:
            assert torch.equal(tgt_out, attn_in[3 * heads :])  # finest self-attention keeps its own
    assert n_self_checked > 0


def test_reweight_edit_in_the_unet(model, inv, tok):
    controller, modes = build_controller(
        tok, SOURCE, [EditSpec(SOURCE, None, 1.0, 0.0, reweight={"cat": 2.0})], T, (8, 8)
    )
    assert modes == ["reweight"]
    rec = Recorder(controller)
    with torch.no_grad():
        sample_with(model, inv, [SOURCE, SOURCE], rec)
    heads = model.unet.config.attention_head_dim
    cat = al.word_token_indices(tok, SOURCE, "cat")
    eq = torch.ones(77)
    eq[cat] = 2.0
    crosses = [(a, o) for is_cross, _, a, o in rec.calls if is_cross]
    assert crosses
    for attn_in, out in crosses:
        assert torch.equal(out[3 * heads :], attn_in[2 * heads : 3 * heads] * eq)


PER_MODE = [
    (AttentionReplace, DOG, None),
    (AttentionRefine, "a cat sitting next to a silver mirror", None),
    (AttentionReweight, SOURCE, {"cat": 2.0, "mirror": 0.5}),
]


@pytest.mark.parametrize("cls, target, reweight", PER_MODE, ids=["replace", "refine", "reweight"])
def test_per_mode_controller_equals_the_generic_path(model, inv, tok, cls, target, reweight):
    """``AttentionReplace`` / ``Refine`` / ``Reweight`` with their defaults and the latent's size build the rule
    ``edit`` builds for the same prompt (mode inferred there), and sample the same edit bit for bit."""
    named = cls(tok, [SOURCE, target], T, reweight=reweight, latent_hw=(8, 8))
    generic, modes = build_controller(tok, SOURCE, [EditSpec(target, reweight=reweight)], T, (8, 8))
    assert modes == [cls.mode]
    for name in ("mapper", "alphas", "equalizer", "cross_replace"):
        assert torch.equal(getattr(named, name), getattr(generic, name)), name
    assert named.self_replace == generic.self_replace == [(0, 1)]  # ⌊0.4 · 4⌋ steps
    assert named.self_replace_max_queries == generic.self_replace_max_queries == 16
    assert named.max_queries == generic.max_queries == 16
    assert named.cross_replace[:, 0, 0].tolist() == [1.0, 1.0, 1.0, 0.0]  # ⌊0.8 · 4⌋ steps
    z0 = sample_with(model, inv, [SOURCE, target], named)
    assert torch.equal(z0, sample_with(model, inv, [SOURCE, target], generic))
    assert torch.equal(z0.cpu(), edit(model, inv, target, reweight=reweight).latents)
    assert not torch.equal(z0[1], z0[0])  # the rule changed the target row
