"""The two kinds of UNet call of the slot engine (``slots.SlotEngine``): the batched arithmetic of each request kind.

``run_no_grad`` — PIVOT (Algorithm 1, line 4: one DDIM inversion step at w = 1), COND (line 9's conditional
branch, once per timestep) and ADVANCE (line 11: z̄_{t−1} from the optimised ∅_t) rows in one call without grad;
``run_grad`` — INNER rows (line 9): the loss of ``SlotBank.training_step``, its gradient to each row's ∅_t through
Fabric's backward, one per-row Adam step through Fabric's optimiser step and precision plugin. Each returns the
answer of every row (None, a ``StepOutcome`` for INNER, or the exception that fails the image alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from nti_lightning.engine.algorithm import Kind, Request, StepOutcome
from nti_lightning.engine.ddim import classifier_free_guidance, ddim_transition, row_alphas

if TYPE_CHECKING:
    from nti_lightning.engine.slots import SlotEngine


def padded(engine: SlotEngine, rows: list[int]) -> list[int]:
    if engine.pad and len(rows) < engine.rows:
        engine.calls["padded_rows"] += engine.rows - len(rows)
        return rows + [rows[-1]] * (engine.rows - len(rows))
    return rows


def timesteps(engine: SlotEngine, requests: list[Request]) -> list[int]:
    """The UNet's timestep per request: t_{T−k} for pivot step k (inversion runs 1, 21, …), else t_i."""
    ts, T = engine.schedule.timesteps, engine.schedule.num_steps
    return [int(ts[T - 1 - r.index]) if r.kind is Kind.PIVOT else int(ts[r.index]) for r in requests]


@torch.no_grad()
def run_no_grad(engine: SlotEngine, rows: list[int]) -> dict[int, Any]:
    """PIVOT, COND and ADVANCE rows in one call without grad, then each kind's DDIM arithmetic."""
    bank, n = engine.bank, len(rows)
    call = padded(engine, rows)
    reqs = [engine.slots[s].request for s in call]
    dev = bank.z_bar.device
    z = torch.stack(
        [bank.trajectory[s, r.index] if r.kind is Kind.PIVOT else bank.z_bar[s] for s, r in zip(call, reqs)]
    )
    t = torch.tensor(timesteps(engine, reqs), device=dev)
    # ADVANCE rows take their ∅_t, the others ψ(P): one gather each, then a row-wise choice
    slots_t = torch.tensor(call, device=dev)
    null = bank.null_rows(slots_t, torch.tensor([r.index for r in reqs], device=dev))
    advance = torch.tensor([r.kind is Kind.ADVANCE for r in reqs], device=dev)
    cond = {
        k: torch.where(advance.view(-1, *[1] * (null[k].dim() - 1)), null[k], bank.cond(k)[slots_t]) for k in bank.keys
    }
    out = engine.denoise(z, t, cond)[:n]  # (n, C, h, w)
    engine.calls["no_grad"] += 1
    engine.calls["rows"] += n
    answers: dict[int, Any] = {}
    by_kind: dict[Kind, list[int]] = {}
    for pos, r in enumerate(reqs[:n]):
        by_kind.setdefault(r.kind, []).append(pos)
    pt = engine.schedule.prediction_type
    if Kind.PIVOT in by_kind:  # line 4: z*_{k+1} = DDIM⁻¹(z*_k, ε(z*_k, t_{k+1}, C)), w = 1
        pos = torch.tensor(by_kind[Kind.PIVOT], device=dev)
        a_from, a_to = row_alphas(engine.schedule, t[pos], inverse=True)
        z_next = ddim_transition(z[pos], out[pos], a_from, a_to, pt)
        slots = torch.tensor([rows[p] for p in by_kind[Kind.PIVOT]], device=dev)
        steps = torch.tensor([reqs[p].index + 1 for p in by_kind[Kind.PIVOT]], device=dev)
        bank.trajectory[slots, steps] = z_next
        for p, ok in zip(by_kind[Kind.PIVOT], torch.isfinite(z_next.flatten(1)).all(1).tolist()):
            answers[rows[p]] = None if ok else FloatingPointError("non-finite latent in the DDIM inversion (pivot)")
    if Kind.COND in by_kind:  # ε(z̄_t, t, C), kept for every inner step of this timestep
        pos = torch.tensor(by_kind[Kind.COND], device=dev)
        bank.cond_out[torch.tensor([rows[p] for p in by_kind[Kind.COND]], device=dev)] = out[pos]
        answers.update({rows[p]: None for p in by_kind[Kind.COND]})
    if Kind.ADVANCE in by_kind:  # line 11: z̄_{t−1} = z_{t−1}(z̄_t, ∅_t, C), guidance w
        pos = torch.tensor(by_kind[Kind.ADVANCE], device=dev)
        slots = torch.tensor([rows[p] for p in by_kind[Kind.ADVANCE]], device=dev)
        guided = classifier_free_guidance(out[pos], bank.cond_out[slots], engine.cfg.guidance_scale)
        a_t, a_prev = row_alphas(engine.schedule, t[pos])
        z_next = ddim_transition(z[pos], guided, a_t, a_prev, pt)
        bank.z_bar[slots] = z_next
        for p, ok in zip(by_kind[Kind.ADVANCE], torch.isfinite(z_next.flatten(1)).all(1).tolist()):
            i = reqs[p].index
            answers[rows[p]] = None if ok else FloatingPointError(f"non-finite latent z̄ at timestep index {i}")
    return answers


def run_grad(engine: SlotEngine, rows: list[int]) -> dict[int, Any]:
    """INNER rows: Algorithm 1, line 9 — the loss, its gradient to each row's ∅_t (the bank's parameters,
    through Fabric's backward), one Adam step per row (through Fabric's optimiser step and precision)."""
    bank, n = engine.bank, len(rows)
    call = padded(engine, rows)
    reqs = [engine.slots[s].request for s in call]
    dev = bank.z_bar.device
    T = engine.schedule.num_steps
    slots = torch.tensor(call, device=dev)
    steps = torch.tensor([r.index for r in reqs], device=dev)
    engine.adam.zero_grad(set_to_none=True)
    with torch.enable_grad():
        batch = {
            "denoise": engine.denoise,
            "schedule": engine.schedule,
            "guidance_scale": engine.cfg.guidance_scale,
            "z": bank.z_bar[slots],
            "t": torch.tensor(timesteps(engine, reqs), device=dev),
            "null": bank.null_rows(slots, steps, optimising=True),  # ∅_t of each row, with grad
            "cond_out": bank.cond_out[slots],
            "target": bank.trajectory[slots, T - 1 - steps],  # z*_{t−1}
        }
        loss = bank.training_step(batch)[:n]  # (n,); padding rows take no part in the loss
        total = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)).sum()
    loss_host = loss.detach().cpu()  # the one host sync of an inner step
    engine.adam.select(slots[:n], [r.lr for r in reqs[:n]], torch.isfinite(loss_host))
    engine.runtime.backward(total)
    engine._stepper.step()  # Fabric: the precision plugin's optimizer_step (16-mixed: per-row unscale and skip)
    engine.calls["grad"] += 1
    engine.calls["rows"] += n
    apply = engine.adam.applied
    with torch.no_grad():
        idx = apply.nonzero().squeeze(1).to(dev)
        if len(idx):
            bank.inner_steps[slots[:n][idx], steps[:n][idx]] += 1
        bank.final_loss[slots[:n], steps[:n]] = loss.detach().float()
    answers: dict[int, Any] = {}
    for pos, s in enumerate(rows):
        value = float(loss_host[pos])
        if value != value or value in (float("inf"), float("-inf")):
            answers[s] = FloatingPointError(
                f"non-finite loss at timestep index {reqs[pos].index} during null-text optimisation; not saved"
            )
        else:
            answers[s] = StepOutcome(value, bool(apply[pos]))
    return answers
