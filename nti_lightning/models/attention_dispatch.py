"""Attention layers that call their processor directly.

diffusers' ``Attention.forward`` inspects its processor's signature on every call (``inspect.signature``, to
filter ``cross_attention_kwargs``) before handing the tensors over. The package never passes
``cross_attention_kwargs``, so the inspection is pure overhead: ~3% of an inner step of the tiny model on one
CPU thread, and host time a GPU waits on between kernels. ``direct_attention_dispatch`` gives every
``Attention`` module of a UNet a forward that calls ``self.processor`` at once with the same arguments —
the same processor, the same operations, the same numbers — and falls back to diffusers' forward whenever
extra keyword arguments arrive. ``stock_attention_dispatch`` undoes it for a block (the benchmark's
baselines run the modules as diffusers ships them).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_MARK = "_nti_direct_dispatch"


def _direct_forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **cross_attention_kwargs):
    if cross_attention_kwargs:  # someone else's kwargs: diffusers' own filtering and warnings
        return type(self).forward(self, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
    return self.processor(
        self, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask
    )


def _attention_modules(unet: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def _install(module: torch.nn.Module) -> None:
    module.forward = types.MethodType(_direct_forward, module)
    module.__dict__[_MARK] = True


def direct_attention_dispatch(unet: torch.nn.Module) -> int:
    """Installs the direct forward on every ``Attention`` module of ``unet`` (idempotent) → modules changed."""
    missing = [m for m in _attention_modules(unet) if _MARK not in m.__dict__]
    for m in missing:
        _install(m)
    return len(missing)


def remove_direct_dispatch(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """Back to diffusers' ``Attention.forward`` → the modules that had the direct forward."""
    removed = []
    for m in _attention_modules(unet):
        if m.__dict__.pop(_MARK, False):
            m.__dict__.pop("forward", None)
            removed.append(m)
    return removed


@contextmanager
def stock_attention_dispatch(unet: torch.nn.Module) -> Iterator[None]:
    """diffusers' own ``Attention.forward`` inside the block, the direct forward restored afterwards."""
    removed = remove_direct_dispatch(unet)
    try:
        yield
    finally:
        for m in removed:
            _install(m)
