"""The inverters NTI is compared with, as generators of UNet requests for the same slot engine.

Each inverter is one small generator like ``algorithm.null_text_inversion`` (Algorithm 1 of Mokady et al. 2023):
it drives one image through the engine by yielding ``Request``s of the kinds the engine already batches
(PIVOT, COND, INNER, ADVANCE) and calling a few non-UNet slot operations between them. The engine knows no
method names: it runs whatever kind of request comes, so every method is batched, checkpointed, resumed and
sharded alike, and each finished image is the same record kind (``inversion.Inversion``) with its method in
``meta["method"]`` and, where sampling must do more than classifier-free guidance, ``meta["sampling"]``.

* ``ddim`` — DDIM inversion (Song et al. 2021) with w = 1 (Mokady et al. 2023, §3.1: the pivot), replayed at
  guidance w with the model's null ψ("") at every step: z̄_T = z*_T, ∅_t = ψ(""). T UNet calls, none with grad.
* ``nti`` — Null-text Inversion, ``algorithm.null_text_inversion`` (unchanged).
* ``npi`` — Negative-prompt Inversion (Miyake et al., "Negative-prompt Inversion: Fast Image Inversion for
  Editing with Text-guided Diffusion Models", arXiv:2305.16807, 2023): NTI's optimised ∅_t is replaced by the
  source prompt's embedding, ∅_t := ψ(P) at every t, so the source branch's guided prediction collapses to
  ε(z_t, t, ψ(P)) and undoes the inversion without optimisation. T UNet calls (the pivot), none with grad.
* ``proxnpi`` — NPI with proximal guidance (Han et al., "Improving Tuning-Free Real Image Editing with Proximal
  Guidance", WACV 2024, arXiv:2306.05414): the record is NPI's plus the whole pivot z*_0 … z*_T, which the edit
  sampler's inversion guidance pulls the latent towards (``step_guidance.ProximalGuidance``).
* ``direct`` — Direct Inversion (Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of
  Code", ICLR 2024): from z̄_T = z*_T with ∅_t = ψ(""), each step computes z_{t−1} = DDIM(z̄_t, CFG_w), stores
  the correction c_t = z*_{t−1} − z_{t−1} and sets z̄_{t−1} = z*_{t−1}; reconstruction and the source branch of
  an edit add c_t after each step (``step_guidance.DirectInversionGuidance``), so they land on z*_0 exactly
  up to rounding. 3T UNet calls (pivot, then conditional + unconditional per step), none with grad.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Protocol

from nti_lightning.config import InversionConfig
from nti_lightning.engine.algorithm import Kind, Request, Slot, StepOutcome, ddim_pivot, null_text_inversion
from nti_lightning.methods import METHODS


class InverterSlot(Slot, Protocol):
    """The slot operations the inverters below need besides ``algorithm.Slot``'s."""

    def fill_nulls(self, source_prompt: bool) -> None: ...  # every ∅_t ← ψ(P) if source_prompt else ψ("")

    def correct_to_pivot(self, i: int) -> None: ...  # c_t ← z*_{t−1} − z̄_{t−1}; z̄_{t−1} ← z*_{t−1}


Generated = Generator[Request, StepOutcome | None, None]


def ddim_only(slot: InverterSlot, cfg: InversionConfig) -> Generated:
    """``ddim``: the pivot only; every ∅_t is the model's null ψ("")."""
    yield from ddim_pivot(slot.progress, cfg.num_ddim_steps, lambda: slot.fill_nulls(source_prompt=False))


def negative_prompt_inversion(slot: InverterSlot, cfg: InversionConfig) -> Generated:
    """``npi`` and ``proxnpi`` (Miyake et al. 2023): the pivot only; every ∅_t := ψ(P), the source prompt."""
    yield from ddim_pivot(slot.progress, cfg.num_ddim_steps, lambda: slot.fill_nulls(source_prompt=True))


def direct_inversion(slot: InverterSlot, cfg: InversionConfig) -> Generated:
    """``direct`` (Ju et al. 2024): the pivot, then per step t = T … 1 one guided DDIM step from z̄_t = z*_t with
    ∅_t = ψ("") and the correction that puts the source branch back on the pivot."""
    p, T = slot.progress, cfg.num_ddim_steps
    yield from ddim_pivot(p, T, slot.start_optimisation)  # z̄_T ← z*_T, ∅_T ← ψ("")
    while p.i < T:
        if not p.has_cond:
            yield Request(Kind.COND, p.i)  # ε(z̄_t, t, ψ(P))
            p.has_cond = True
        yield Request(Kind.ADVANCE, p.i)  # z_{t−1} = DDIM(z̄_t, ε(∅_t) + w·(ε(ψ(P)) − ε(∅_t)))
        slot.correct_to_pivot(p.i)  # c_t = z*_{t−1} − z_{t−1}; z̄_{t−1} = z*_{t−1}
        if p.i + 1 < T:
            slot.carry_null_forward(p.i)  # ∅_{t−1} = ∅_t = ψ("")
        p.i, p.has_cond = p.i + 1, False


def proximal_sampling(cfg: InversionConfig) -> dict:
    """What the edit sampler applies for ``proxnpi`` (Han et al. 2023), recorded in ``meta["sampling"]``."""
    return {
        "kind": "proximal",
        "operator": cfg.prox_operator,
        "quantile": cfg.prox_quantile,
        "recon_t": cfg.prox_recon_t,
        "recon_lr": cfg.prox_recon_lr,
        "dilate": cfg.prox_dilate,
    }


@dataclass(frozen=True)
class Inverter:
    """One method: its generator, what its record keeps beyond z_T and {∅_t}, and what sampling applies."""

    name: str
    run: Callable[[InverterSlot, InversionConfig], Generated]
    keeps_trajectory: bool = False  # the record holds z*_0 … z*_T (proxnpi's inversion guidance)
    keeps_corrections: bool = False  # the record holds c_t per step (direct)
    sampling: Callable[[InversionConfig], dict] | None = None  # → meta["sampling"], read by step_guidance


INVERTERS: dict[str, Inverter] = {
    "ddim": Inverter("ddim", ddim_only),
    "nti": Inverter("nti", null_text_inversion),
    "npi": Inverter("npi", negative_prompt_inversion),
    "proxnpi": Inverter("proxnpi", negative_prompt_inversion, keeps_trajectory=True, sampling=proximal_sampling),
    "direct": Inverter("direct", direct_inversion, keeps_corrections=True, sampling=lambda cfg: {"kind": "direct"}),
}
assert tuple(sorted(INVERTERS)) == tuple(sorted(METHODS))


def get_inverter(name: str) -> Inverter:
    """The inverter called ``name``; a ValueError listing the choices otherwise."""
    if name not in INVERTERS:
        raise ValueError(f"unknown inversion method {name!r}; choose one of {', '.join(METHODS)}")
    return INVERTERS[name]
