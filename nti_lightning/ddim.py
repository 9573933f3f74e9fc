"""DDIM sampling and inversion as small pure functions.

Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0) moves a latent between two noise levels given a
noise prediction; read backwards it is DDIM inversion, the pivot of Null-text Inversion
(Mokady et al. 2023, §3.1 and Algorithm 1, line 4). Both directions are the same transition with the two
alphas swapped, so one function serves both.

Conventions: ``alphas_cumprod[t]`` is ᾱ_t of the training schedule; ``timesteps`` are the inference
timesteps in sampling order (981, 961, …, 1 for SD1.x with T = 50). The step below timestep ``t`` is
``t - num_train_timesteps // T``; where that is negative ᾱ is the scheduler's final ᾱ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DDIMSchedule:
    """The numbers a DDIM sampler needs: inference timesteps and the cumulative alphas."""

    timesteps: Tensor  # (T,) long, sampling order: descending
    alphas_cumprod: Tensor  # (num_train_timesteps,) float32
    final_alpha_cumprod: Tensor  # () float32; ᾱ used below timestep 0
    num_train_timesteps: int

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def step_ratio(self) -> int:
        return self.num_train_timesteps // self.num_steps

    def alpha(self, t: int) -> Tensor:
        """ᾱ_t, or the final ᾱ for t < 0 (diffusers' DDIMScheduler convention)."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def prev_timestep(self, t: int) -> int:
        return t - self.step_ratio


def schedule_from_scheduler(scheduler, num_steps: int) -> DDIMSchedule:
    """Builds the schedule from a diffusers ``DDIMScheduler`` (its ``set_timesteps`` picks the timesteps)."""
    if num_steps < 1:
        raise ValueError(f"num_ddim_steps must be >= 1, got {num_steps}")
    scheduler.set_timesteps(num_steps)
    return DDIMSchedule(
        timesteps=scheduler.timesteps.clone().long(),
        alphas_cumprod=scheduler.alphas_cumprod.clone().float(),
        final_alpha_cumprod=torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).clone(),
        num_train_timesteps=int(scheduler.config.num_train_timesteps),
    )


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------


def ddim_transition(sample: Tensor, eps: Tensor, alpha_from: Tensor, alpha_to: Tensor) -> Tensor:
    """Moves ``sample`` from noise level ᾱ_from to ᾱ_to along the DDIM ODE (eq. 12, eta = 0).

    x̂_0 = (z - √(1-ᾱ_from) ε) / √ᾱ_from;  z' = √ᾱ_to x̂_0 + √(1-ᾱ_to) ε.
    The operation order is diffusers' ``DDIMScheduler.step`` so results agree to the last bit.
    """
    alpha_from = alpha_from.to(sample.device)
    alpha_to = alpha_to.to(sample.device)
    beta_from = 1 - alpha_from
    pred_original = (sample - beta_from ** (0.5) * eps) / alpha_from ** (0.5)
    direction = (1 - alpha_to) ** (0.5) * eps
    return alpha_to ** (0.5) * pred_original + direction


def ddim_step(schedule: DDIMSchedule, sample: Tensor, eps: Tensor, t: int) -> Tensor:
    """One sampling step z_t → z_{t-1} (Algorithm 1, the map z_{t-1}(z̄_t, ∅_t, C))."""
    return ddim_transition(sample, eps, schedule.alpha(t), schedule.alpha(schedule.prev_timestep(t)))


def ddim_inverse_step(schedule: DDIMSchedule, sample: Tensor, eps: Tensor, t: int) -> Tensor:
    """One inversion step towards timestep ``t``: z_{t-1} → z_t, with ε evaluated at ``t`` on z_{t-1}.

    This is the authors' ``next_step``: the UNet runs at the destination timestep on the less noisy latent,
    and the start ᾱ is ᾱ[t - 1000/T] (the final ᾱ when negative).
    """
    return ddim_transition(sample, eps, schedule.alpha(schedule.prev_timestep(t)), schedule.alpha(t))


def classifier_free_guidance(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float) -> Tensor:
    """ε̃ = ε(∅) + w (ε(C) − ε(∅)) (Ho & Salimans 2022; Mokady et al. 2023 §3, eq. 2)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


# ---------------------------------------------------------------------------------------------------------
# Null-text optimisation schedule (Mokady et al. 2023, §4 implementation details)
# ---------------------------------------------------------------------------------------------------------


def null_text_lr(base_lr: float, step_index: int, decay_horizon: int) -> float:
    """Learning rate at outer step i: base_lr · (1 − i / horizon); the authors use 1e-2 and 100."""
    if step_index >= decay_horizon:
        raise ValueError(
            f"outer step {step_index} reaches lr_decay_horizon={decay_horizon}: the learning rate "
            f"base_lr·(1 − i/{decay_horizon}) would be ≤ 0. Raise inversion.lr_decay_horizon above "
            f"num_ddim_steps."
        )
    return base_lr * (1.0 - step_index / decay_horizon)


def early_stop_threshold(epsilon: float, slope: float, step_index: int) -> float:
    """Loss below which the inner loop stops at outer step i: ε + i·slope (authors: 1e-5 + i·2e-5)."""
    return epsilon + step_index * slope


def latent_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image mean squared error ‖z*_{t-1} − z_{t-1}‖² / numel (Algorithm 1, line 9).

    pred, target: (B, C, h, w) → (B,). Summing the result gives each image the gradient it would get alone.
    """
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
