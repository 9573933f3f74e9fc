"""``p2p.attention``: the processor hands every map to the controller; an identity controller is the stock one."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from nti_lightning.p2p import EmptyControl, attention_control
from nti_lightning.p2p.attention import place_in_unet

from .helpers import Recorder, unet_inputs


@torch.no_grad()
def test_identity_controller_equals_stock_processor(model):
    unet = model.unet
    z, t, c = unet_inputs()
    original = dict(unet.attn_processors)
    unet.set_attn_processor(AttnProcessor())
    try:
        stock = unet(z, t, encoder_hidden_states=c).sample
        with attention_control(unet, EmptyControl()):
            assert all(type(p).__name__ == "P2PAttnProcessor" for p in unet.attn_processors.values())
            controlled = unet(z, t, encoder_hidden_states=c).sample
        assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())  # restored
    finally:
        unet.set_attn_processor(dict(original))
    assert torch.equal(controlled, stock)
    assert {k: id(v) for k, v in unet.attn_processors.items()} == {k: id(v) for k, v in original.items()}


@torch.no_grad()
def test_processor_hands_every_map_with_its_place(model):
    unet = model.unet
    z, t, c = unet_inputs()
    rec = Recorder(EmptyControl())
    with attention_control(unet, rec):
        unet(z, t, encoder_hidden_states=c)
    names = list(unet.attn_processors)
    assert len(rec.calls) == len(names)
    expected = sorted((".attn2." in n, place_in_unet(n)) for n in names)
    assert sorted((is_cross, place) for is_cross, place, _, _ in rec.calls) == expected
    heads = unet.config.attention_head_dim  # diffusers reads it as the number of heads
    for is_cross, _, attn, _ in rec.calls:
        assert attn.shape[0] == 2 * heads
        assert attn.shape[2] == (77 if is_cross else attn.shape[1])
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:2]))  # softmax rows


def test_processors_restored_after_error(model):
    before = {k: id(v) for k, v in model.unet.attn_processors.items()}
    with pytest.raises(RuntimeError):
        with attention_control(model.unet, EmptyControl()):
            raise RuntimeError("boom")
    assert {k: id(v) for k, v in model.unet.attn_processors.items()} == before
