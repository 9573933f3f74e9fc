"""Attention layers that call their processor directly, on the diffusers versions where that is tested.

diffusers' ``Attention.forward`` inspects its processor's signature on every call (``inspect.signature``, to
filter ``cross_attention_kwargs``) before handing the tensors over. The package never passes
``cross_attention_kwargs``, so the inspection is pure overhead: ~3% of an inner step of the tiny model on one
CPU thread, and host time a GPU waits on between kernels. ``direct_attention_dispatch`` gives every
``Attention`` module of a UNet a forward that calls ``self.processor`` at once with the same arguments —
the same processor, the same operations, the same numbers — and falls back to diffusers' forward whenever
extra keyword arguments arrive. ``stock_attention_dispatch`` undoes it for a block (the benchmark's
baselines run the modules as diffusers ships them).

The shortcut relies on a private contract: that ``Attention.forward(hidden_states, encoder_hidden_states,
attention_mask, **cross_attention_kwargs)`` only filters the kwargs and calls
``self.processor(self, hidden_states, encoder_hidden_states=…, attention_mask=…)``. It is installed only where
``dispatch_check`` finds a diffusers release inside ``TESTED_DIFFUSERS`` (the range CI proves bit-identical,
tests/models/test_attention_dispatch.py) whose ``Attention.forward`` still has that signature; elsewhere diffusers'
own forward runs, and one log line says why.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch

_MARK = "_nti_direct_dispatch"
logger = logging.getLogger(__name__)

TESTED_DIFFUSERS = ("0.28.2", "0.43")
"""[oldest, first untested) diffusers releases where the direct forward is tested bit-identical to diffusers'
(CI: the floors environment, the middle point and the newest release; docs/versions.md)."""
FORWARD_PARAMETERS = (
    ("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ("hidden_states", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ("encoder_hidden_states", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ("attention_mask", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ("cross_attention_kwargs", inspect.Parameter.VAR_KEYWORD),
)
"""``Attention.forward``'s parameters (name, kind) that the direct forward reproduces."""


def _direct_forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **cross_attention_kwargs):
    if cross_attention_kwargs:  # someone else's kwargs: diffusers' own filtering and warnings
        return type(self).forward(self, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
    return self.processor(
        self, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask
    )


def forward_parameters(attention_class) -> tuple[tuple[str, object], ...]:
    """(name, kind) of each parameter of ``attention_class.forward``."""
    return tuple((p.name, p.kind) for p in inspect.signature(attention_class.forward).parameters.values())


def dispatch_check(version: str, attention_class) -> str | None:
    """None where the direct forward may replace ``attention_class.forward`` of diffusers ``version``; else why not."""
    from packaging.version import Version

    low, high = (Version(v) for v in TESTED_DIFFUSERS)
    if not low <= Version(version) < high:
        return f"diffusers {version} is outside the range it is tested on ({low} ≤ version < {high})"
    found = forward_parameters(attention_class)
    if found != FORWARD_PARAMETERS:
        names = ", ".join(name for name, _ in found)
        return f"diffusers {version}'s Attention.forward takes ({names}), not the tested contract"
    return None


@lru_cache(maxsize=1)
def _installed_check() -> str | None:
    import diffusers
    from diffusers.models.attention_processor import Attention

    reason = dispatch_check(diffusers.__version__, Attention)
    if reason is not None:
        logger.warning("attention: diffusers' own Attention.forward is used (%s)", reason)
    return reason


def direct_dispatch_enabled() -> bool:
    """Whether the installed diffusers passes ``dispatch_check`` (the reason is logged once otherwise)."""
    return _installed_check() is None


def _attention_modules(unet: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def _install(module: torch.nn.Module) -> None:
    module.forward = types.MethodType(_direct_forward, module)
    module.__dict__[_MARK] = True


def direct_attention_dispatch(unet: torch.nn.Module) -> int:
    """Installs the direct forward on every ``Attention`` module of ``unet`` (idempotent) → modules changed;
    none where the installed diffusers is not one it is tested on (``direct_dispatch_enabled``)."""
    if not direct_dispatch_enabled():
        return 0
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
