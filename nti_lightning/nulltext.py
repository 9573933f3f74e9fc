"""Null-text optimisation (Mokady et al. 2023, Algorithm 1, lines 5–12): the Lightning module and its loop.

The module is thin: its learnable parameters are the batch's T null embeddings ∅_T…∅_1, and its
``training_step`` is Algorithm 1, line 9 (one guided DDIM step and the loss against the pivot). The loop
``optimize_null_text`` steps t = T → 1 with up to N inner Adam steps each, written once, top to bottom.

Batching: B images share each UNet call, but every image keeps its own early stop. Adam is elementwise,
so one Adam over the (B, L, D) parameter equals B separate Adams as long as an image that stopped never
moves again: its rows are excluded from the UNet call and restored after each ``step()`` (Adam's momentum
would otherwise move them with a zero gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import Tensor, nn

from nti_lightning.config import InversionConfig
from nti_lightning.ddim import (
    DDIMSchedule,
    classifier_free_guidance,
    ddim_step,
    early_stop_threshold,
    latent_mse,
    null_text_lr,
)
from nti_lightning.engine import Denoiser
from nti_lightning.runtime import Runtime


class NullTextInversionModule(L.LightningModule):
    """Learnable parameters: ∅_t for every timestep, each (B, L, D) float32 (index i ↔ timesteps[i])."""

    def __init__(self, null_init: Tensor, num_steps: int) -> None:
        super().__init__()
        init = null_init.detach().float()  # (B, L, D)
        self.null_embeddings = nn.ParameterList([nn.Parameter(init.clone()) for _ in range(num_steps)])

    @torch.no_grad()
    def begin_timestep(self, i: int) -> None:
        """∅_{t−1} starts from ∅_t (Algorithm 1, line 11); ∅_T starts from ψ("") (line 6)."""
        if i > 0:
            self.null_embeddings[i].copy_(self.null_embeddings[i - 1])

    def training_step(self, batch: StepInputs, batch_idx: int = 0) -> Tensor:
        """Algorithm 1, line 9 for the active images: per-image ‖z*_{t−1} − z_{t−1}(z̄_t, ∅_t, C)‖² → (n,)."""
        null = self.null_embeddings[batch.step_index][batch.rows]  # (n, L, D), with grad
        eps_uncond = batch.denoiser(batch.z_bar, batch.t, null)  # (n, C, h, w)
        eps = classifier_free_guidance(eps_uncond, batch.eps_cond, batch.guidance_scale)
        z_prev = ddim_step(batch.schedule, batch.z_bar, eps, int(batch.t))
        return latent_mse(z_prev, batch.target)  # (n,)

    def stacked(self) -> Tensor:
        """(T, B, L, D) detached copy of all null embeddings."""
        return torch.stack([p.detach() for p in self.null_embeddings])


@dataclass
class StepInputs:
    """What one inner step needs, restricted to the active rows."""

    step_index: int
    t: Tensor
    rows: Tensor  # (n,) long: which images of the batch
    z_bar: Tensor  # (n, C, h, w)
    eps_cond: Tensor  # (n, C, h, w)
    target: Tensor  # (n, C, h, w): z*_{t-1}
    denoiser: Denoiser
    schedule: DDIMSchedule
    guidance_scale: float


@dataclass
class LoopState:
    """Where the loop stands; with the module's state dict, enough to resume bit for bit."""

    step_index: int  # next outer step i (t = timesteps[i])
    z_bar: Tensor  # (B, C, h, w): z̄_t for t = timesteps[step_index]
    failed: Tensor  # (B,) bool: non-finite loss or latent
    inner_steps: Tensor  # (T, B) long: Adam steps applied per timestep
    final_loss: Tensor  # (T, B) float: last loss computed per timestep
    skipped_steps: Tensor  # (B,) long: GradScaler-skipped steps (16-mixed)
    unet_calls: dict[str, int] = field(default_factory=lambda: {"cond": 0, "uncond_grad": 0, "uncond": 0})

    @classmethod
    def initial(cls, z_T: Tensor, num_steps: int) -> LoopState:
        B = z_T.shape[0]
        return cls(
            step_index=0,
            z_bar=z_T.detach().float().clone(),
            failed=torch.zeros(B, dtype=torch.bool),
            inner_steps=torch.zeros(num_steps, B, dtype=torch.long),
            final_loss=torch.full((num_steps, B), float("nan")),
            skipped_steps=torch.zeros(B, dtype=torch.long),
        )


def optimize_null_text(
    module: NullTextInversionModule,
    denoiser: Denoiser,
    schedule: DDIMSchedule,
    trajectory: Tensor,
    cond: Tensor,
    cfg: InversionConfig,
    runtime: Runtime | None = None,
    state: LoopState | None = None,
    on_timestep_end: Callable[[LoopState], None] | None = None,
) -> LoopState:
    """Algorithm 1, lines 6–12 for a batch. trajectory: (T + 1, B, C, h, w) pivot from ``ddim_inversion``;
    cond: (B, L, D) = ψ(prompts). Optimises ``module.null_embeddings`` in place and returns the final state
    (``state.z_bar`` is then z̄_0, the NTI reconstruction latent). Pass ``state`` to resume.

    Per timestep: one conditional UNet call without grad; each inner step one unconditional call with grad
    on the images still optimising; one unconditional call without grad for z̄_{t−1}
    (``skip_redundant_unet_calls=False`` recomputes the conditional branch there, as the authors' code does).
    """
    runtime = runtime or Runtime()
    T = schedule.num_steps
    state = state or LoopState.initial(trajectory[T], T)
    device = trajectory.device
    for i in range(state.step_index, T):
        t = schedule.timesteps[i].to(device)
        target = trajectory[T - i - 1]  # z*_{t-1}: (B, C, h, w)
        z_bar = state.z_bar.to(device)

        # 1. ∅_t starts from ∅_{t+1} (ψ("") at t = T)
        module.begin_timestep(i)
        null_t = module.null_embeddings[i]

        # 2. The conditional branch once per timestep, without grad
        with torch.no_grad():
            eps_cond = denoiser(z_bar, t, cond)
        state.unet_calls["cond"] += 1

        # 3. A fresh Adam per timestep with the decayed learning rate
        optimizer = runtime.setup_optimizer(
            torch.optim.Adam([null_t], lr=null_text_lr(cfg.learning_rate, i, cfg.lr_decay_horizon))
        )
        threshold = early_stop_threshold(cfg.early_stop_epsilon, cfg.early_stop_slope, i)
        active = ~state.failed.to(device)

        # 4. Up to N inner steps; each image stops on its own
        applied = 0
        while applied < cfg.num_inner_steps and bool(active.any()):
            rows = active.nonzero().squeeze(1)
            all_rows = len(rows) == len(active)
            loss = module.training_step(
                StepInputs(
                    step_index=i,
                    t=t,
                    rows=rows,
                    z_bar=z_bar if all_rows else z_bar[rows],
                    eps_cond=eps_cond if all_rows else eps_cond[rows],
                    target=target if all_rows else target[rows],
                    denoiser=denoiser,
                    schedule=schedule,
                    guidance_scale=cfg.guidance_scale,
                )
            )  # (n,)
            state.unet_calls["uncond_grad"] += 1
            loss_value = loss.detach().cpu()  # one host sync per inner step
            rows_cpu = rows.cpu()
            finite = torch.isfinite(loss_value)
            if not bool(finite.all()):
                bad = rows_cpu[~finite]
                state.failed[bad] = True
                active[bad.to(device)] = False
            frozen = ~active  # rows that must not move in this step
            keep = null_t.detach()[frozen].clone()
            optimizer.zero_grad(set_to_none=True)
            runtime.backward(loss[finite.to(loss.device)].sum())
            stepped = runtime.optimizer_step(optimizer)
            with torch.no_grad():
                null_t[frozen] = keep
            state.final_loss[i, rows_cpu] = loss_value
            if not stepped:  # 16-mixed overflow: nothing moved; counted, and not charged to the budget of N
                state.skipped_steps[rows_cpu[finite]] += 1
                if int(state.skipped_steps.max()) > 10 * max(cfg.num_inner_steps, 1) * T:
                    raise FloatingPointError("GradScaler skipped too many steps; use bf16-mixed or 32-true")
                continue
            state.inner_steps[i, rows_cpu[finite]] += 1
            applied += 1
            if cfg.early_stop:
                # the test uses the loss from before this update; the update is kept (authors' order)
                converged = rows[(loss_value < threshold).to(device)]
                active[converged] = False

        # 5. z̄_{t−1} = z_{t−1}(z̄_t, ∅_t, C) with the optimised ∅_t
        with torch.no_grad():
            if cfg.skip_redundant_unet_calls:
                eps_uncond = denoiser(z_bar, t, null_t)
                state.unet_calls["uncond"] += 1
            else:  # the authors' structure: both branches again in one batched call
                eps_uncond, eps_cond = denoiser(torch.cat([z_bar, z_bar]), t, torch.cat([null_t.detach(), cond])).chunk(
                    2
                )
                state.unet_calls["uncond"] += 1
                state.unet_calls["cond"] += 1
            z_next = ddim_step(
                schedule, z_bar, classifier_free_guidance(eps_uncond, eps_cond, cfg.guidance_scale), int(t)
            )
        bad_latent = ~torch.isfinite(z_next.flatten(1)).all(dim=1).cpu()
        state.failed |= bad_latent
        state.z_bar = z_next
        state.step_index = i + 1
        if on_timestep_end is not None:
            on_timestep_end(state)
    return state
