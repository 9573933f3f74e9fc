"""Null-text Inversion — Algorithm 1 of Mokady et al. (CVPR 2023) — for one image, top to bottom.

    1  Input: a source prompt embedding C = ψ(P) and input image I.
    2  Output: noise vector z_T and optimised embeddings {∅_t}, t = 1 … T.
    3  Set guidance scale w = 1;
    4  Compute the intermediate results z*_T, …, z*_0 using DDIM inversion over I;
    5  Set guidance scale w = 7.5;
    6  Initialise z̄_T ← z*_T, ∅_T ← ψ("");
    7  for t = T, T − 1, …, 1 do
    8      for j = 0, …, N − 1 do
    9          ∅_t ← ∅_t − η ∇_∅ ‖z*_{t−1} − z_{t−1}(z̄_t, ∅_t, C)‖²;
    10     end
    11     Set z̄_{t−1} ← z_{t−1}(z̄_t, ∅_t, C), ∅_{t−1} ← ∅_t;
    12 end
    13 Return z̄_T, {∅_t}_{t=1}^T

``null_text_inversion`` is that algorithm as a generator: every ``yield`` is one UNet evaluation of this image
(a ``Request``), which the continuous-batching executor (``slots.SlotEngine``) runs in one batch with other
images' evaluations and answers. The image's control flow — which step comes next, the learning rate, the
early stop — lives here and nowhere else; the batched arithmetic of each kind of step lives in ``slots.py``.
The implementation details are the authors' (their notebook, §4 of the paper): η = 1e-2·(1 − i/100) with a
fresh Adam per timestep, N = 10, and the inner loop stops once the loss *before* a step is
< 1e-5 + i·2e-5 (the step itself is kept).

Where the image stands is all in ``Progress`` (plain numbers) and the image's slot tensors, so a generator
started again from a checkpointed ``Progress`` reaches the same ``yield`` it was suspended at: resume is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from nti_lightning.config import InversionConfig
from nti_lightning.engine.nulltext import early_stop_threshold, null_text_lr


class Kind(str, Enum):
    """The four UNet evaluations of Algorithm 1."""

    PIVOT = "pivot"  # line 4: ε(z*_k, t, C) for one DDIM inversion step z*_k → z*_{k+1}, no grad
    COND = "cond"  # line 9, once per timestep: ε(z̄_t, t, C), no grad (it does not depend on ∅_t)
    INNER = "inner"  # line 9: ε(z̄_t, t, ∅_t) with grad to ∅_t, the loss, and one Adam step
    ADVANCE = "advance"  # line 11: ε(z̄_t, t, ∅_t) with the optimised ∅_t, no grad, → z̄_{t−1}

    @property
    def needs_grad(self) -> bool:
        return self is Kind.INNER


@dataclass(frozen=True)
class Request:
    """One UNet evaluation an image needs next. ``index``: the pivot step k for PIVOT (the UNet runs at
    timestep t_{T−k}), else the outer step i (timestep t = timesteps[i])."""

    kind: Kind
    index: int
    lr: float = 0.0  # INNER: this step's learning rate


@dataclass(frozen=True)
class StepOutcome:
    """The executor's answer to an INNER request: the loss before the step, and whether the step was applied
    (16-mixed skips a step whose gradients overflowed; it is not charged to the N inner steps)."""

    loss: float
    applied: bool = True


@dataclass
class Progress:
    """Where one image stands in Algorithm 1 (with its slot's tensors, the whole state)."""

    pivot_steps: int = 0  # DDIM inversion steps done (line 4)
    i: int = 0  # outer step: t = timesteps[i], i = 0 ↔ t = T (line 7)
    j: int = 0  # Adam steps applied at this timestep (line 8)
    has_cond: bool = False  # ε(z̄_t, t, C) is computed for this timestep
    converged: bool = False  # the early-stop rule was met at this timestep
    skipped: int = 0  # 16-mixed steps skipped for overflowing gradients


class Slot(Protocol):
    """What Algorithm 1 does to its image's tensors besides UNet evaluations (``slots.SlotEngine``)."""

    progress: Progress

    def start_optimisation(self) -> None: ...  # line 6: z̄_T ← z*_T, ∅_T ← ψ("")

    def fresh_adam(self) -> None: ...  # line 9: a new Adam (moments and step count reset) per timestep

    def commit_null(self, i: int) -> None: ...  # lines 10–11: the optimised ∅_t into {∅_t}; ∅_{t−1} starts from it

    def carry_null_forward(self, i: int) -> None: ...  # ∅_{t−1} ← ∅_t for a method that does not optimise


MAX_SKIPS_PER_STEP = 10
"""16-mixed: an image fails once its skipped steps exceed this many per inner step of its budget."""


def ddim_pivot(p: Progress, T: int, then: Callable[[], None]) -> Generator[Request, None, None]:
    """Lines 3–4: the pivot z*_0 → z*_T, DDIM inversion with w = 1 (the conditional branch only), one PIVOT
    request per step; ``then()`` runs once, right after the last step (a restart past it does not re-run it)."""
    while p.pivot_steps < T:
        yield Request(Kind.PIVOT, p.pivot_steps)
        p.pivot_steps += 1
        if p.pivot_steps == T:
            then()


def null_text_inversion(slot: Slot, cfg: InversionConfig) -> Generator[Request, StepOutcome | None, None]:
    """Algorithm 1 for the image in ``slot``; yields its UNet evaluations, receives an ``StepOutcome`` for
    each INNER request (None for the others). Raises ``FloatingPointError`` when 16-mixed keeps overflowing."""
    p, T, N = slot.progress, cfg.num_ddim_steps, cfg.num_inner_steps
    # Lines 3–4: the pivot z*_0 → z*_T; then line 6: z̄_T ← z*_T, ∅_T ← ψ("")
    yield from ddim_pivot(p, T, slot.start_optimisation)
    # Line 5: from here on w = cfg.guidance_scale (7.5)
    # Line 7: for t = T … 1 (i = 0 … T − 1)
    while p.i < T:
        if not p.has_cond:
            yield Request(Kind.COND, p.i)  # ε(z̄_t, t, C): once per timestep, reused by every inner step
            p.has_cond = True
            slot.fresh_adam()
        # Lines 8–10: up to N Adam steps on ∅_t against the pivot z*_{t−1}
        lr = null_text_lr(cfg.learning_rate, p.i, cfg.lr_decay_horizon)
        threshold = early_stop_threshold(cfg.early_stop_epsilon, cfg.early_stop_slope, p.i)
        while p.j < N and not p.converged:
            outcome = yield Request(Kind.INNER, p.i, lr)
            if not outcome.applied:  # 16-mixed overflow: nothing moved
                p.skipped += 1
                if p.skipped > MAX_SKIPS_PER_STEP * max(N, 1) * T:
                    raise FloatingPointError("16-mixed skipped too many steps; use bf16-mixed or 32-true")
                continue
            p.j += 1
            # the test uses the loss from before this step; the step is kept (the authors' order)
            p.converged = cfg.early_stop and outcome.loss < threshold
        # Line 11: ∅_t is done (kept in {∅_t}; ∅_{t−1} starts from it); z̄_{t−1} ← z_{t−1}(z̄_t, ∅_t, C)
        slot.commit_null(p.i)
        yield Request(Kind.ADVANCE, p.i)
        p.i, p.j, p.has_cond, p.converged = p.i + 1, 0, False, False
    # Line 13: z̄_T = z*_T and {∅_t} are in the slot
