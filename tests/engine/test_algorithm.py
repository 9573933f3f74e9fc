"""Algorithm 1 as a generator, driven directly with a fake slot and no UNet: the order of its UNet requests, the
authors' learning-rate schedule and early stop, ∅_t carried forward, 16-mixed skips, resume from Progress."""

from __future__ import annotations

import pytest

from nti_lightning.config import InversionConfig
from nti_lightning.engine.algorithm import Kind, Progress, StepOutcome, null_text_inversion


class FakeSlot:
    """Records what Algorithm 1 does to its image besides UNet calls."""

    def __init__(self, progress: Progress | None = None) -> None:
        self.progress = progress or Progress()
        self.calls: list[tuple] = []

    def start_optimisation(self) -> None:
        self.calls.append(("start",))

    def fresh_adam(self) -> None:
        self.calls.append(("adam", self.progress.i))

    def commit_null(self, i: int) -> None:
        self.calls.append(("commit", i))

    def carry_null_forward(self, i: int) -> None:  # pragma: no cover - NTI never calls it
        raise AssertionError("NTI keeps ∅_t in its parameter: nothing to carry")


def drive(cfg, losses, slot=None, stop_after=None):
    """Runs the generator; INNER requests are answered with ``losses(i, j)`` (a loss, or None for an overflowed
    16-mixed step). Returns the requests, the slot, and the generator if stopped early."""
    slot = slot or FakeSlot()
    gen = null_text_inversion(slot, cfg)
    requests, answer = [], None
    try:
        while True:
            req = gen.send(answer)
            requests.append(req)
            if stop_after is not None and len(requests) == stop_after:
                return requests, slot
            if req.kind is Kind.INNER:
                loss = losses(req.index, slot.progress.j)
                answer = StepOutcome(1.0, applied=False) if loss is None else StepOutcome(loss)
            else:
                answer = None
    except StopIteration:
        return requests, slot


def test_the_request_order_of_algorithm_1():
    cfg = InversionConfig(num_ddim_steps=3, num_inner_steps=2, early_stop=False)
    requests, slot = drive(cfg, lambda i, j: 1.0)
    kinds = [(r.kind.value, r.index) for r in requests]
    pivot = [("pivot", k) for k in range(3)]  # lines 3–4: z*_0 → z*_T with w = 1
    per_t = lambda i: [("cond", i), ("inner", i), ("inner", i), ("advance", i)]  # noqa: E731 — lines 8–11
    assert kinds == pivot + per_t(0) + per_t(1) + per_t(2)
    assert slot.calls == [("start",), ("adam", 0), ("commit", 0), ("adam", 1), ("commit", 1), ("adam", 2),
                          ("commit", 2)]  # fmt: skip
    assert slot.progress.i == 3 and slot.progress.pivot_steps == 3


def test_the_authors_learning_rate_and_early_stop():
    """lr = 1e-2·(1 − i/100); the inner loop stops once the loss *before* a step is < 1e-5 + i·2e-5, and that step
    is kept (it counts among the applied ones)."""
    cfg = InversionConfig(num_ddim_steps=4, num_inner_steps=10)
    threshold = [1e-5 + i * 2e-5 for i in range(4)]
    requests, _ = drive(cfg, lambda i, j: threshold[i] * (0.5 if j == 2 else 2))  # converges at the 3rd step
    inner = [r for r in requests if r.kind is Kind.INNER]
    assert [r.index for r in inner] == [i for i in range(4) for _ in range(3)]
    assert [r.lr for r in inner[::3]] == pytest.approx([1e-2 * (1 - i / 100) for i in range(4)])


def test_overflowed_steps_are_not_charged_and_too_many_fail():
    cfg = InversionConfig(num_ddim_steps=2, num_inner_steps=2, early_stop=False)
    skips = {(0, 0)}  # the first step of t = T overflows once

    def losses(i, j):
        if (i, j) in skips:
            skips.discard((i, j))
            return None
        return 1.0

    requests, slot = drive(cfg, losses)
    assert sum(r.kind is Kind.INNER for r in requests) == 5 and slot.progress.skipped == 1
    with pytest.raises(FloatingPointError, match="16-mixed skipped too many"):
        drive(cfg, lambda i, j: None)


def test_a_generator_restarted_from_its_progress_continues_where_it_stood():
    """Resume: a new generator on the same Progress asks for exactly the request the first was waiting on."""
    cfg = InversionConfig(num_ddim_steps=3, num_inner_steps=3, early_stop=False)
    full, _ = drive(cfg, lambda i, j: 1.0)
    for cut in (2, 5, 9, 14):
        head, slot = drive(cfg, lambda i, j: 1.0, stop_after=cut)
        rest, _ = drive(cfg, lambda i, j: 1.0, slot=FakeSlot(slot.progress))
        assert head[:-1] + rest == full, cut  # the request pending at the cut is asked again
