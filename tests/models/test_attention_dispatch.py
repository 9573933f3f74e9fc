"""The loaded UNet's attention calls its processor directly: same numbers, no per-call signature inspection."""

from __future__ import annotations

import inspect

import torch

from nti_lightning.models.attention_dispatch import direct_attention_dispatch, stock_attention_dispatch


def _unet_out(model):
    unet = model.unet
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    context = torch.randn(2, model.context_length, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor([981, 21]), encoder_hidden_states=context, return_dict=False)[0]


def _attention_modules(unet):
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def test_loaded_unet_dispatches_directly_with_bit_identical_output(random_model, monkeypatch):
    modules = _attention_modules(random_model.unet)
    assert modules and all("forward" in m.__dict__ for m in modules)
    assert direct_attention_dispatch(random_model.unet) == 0  # idempotent: already installed at load

    calls = []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(a) or real(*a, **k))
    direct = _unet_out(random_model)
    assert calls == []  # the direct forward never inspects
    with stock_attention_dispatch(random_model.unet):
        assert not any("forward" in m.__dict__ for m in modules)
        stock = _unet_out(random_model)
    assert len(calls) >= len(modules)  # diffusers' forward inspects once per attention call
    assert all("forward" in m.__dict__ for m in modules)  # restored after the block
    assert torch.equal(direct, stock)


def test_extra_kwargs_fall_back_to_diffusers_forward(random_model):
    attn = _attention_modules(random_model.unet)[0]
    x = torch.randn(1, 8, attn.to_q.in_features)
    with torch.no_grad():
        plain = attn(x)
        # an unknown kwarg goes through diffusers' filtering (logged and dropped), not into the processor's call
        extra = attn(x, not_a_processor_argument=1)
    assert torch.equal(plain, extra)
