"""DDIM sampling and inversion as small pure functions.

Deterministic DDIM (Song et al. 2021, eq. 12 with η = 0) moves a latent between two noise levels given a
model prediction; read backwards it is DDIM inversion, the pivot of Null-text Inversion (Mokady et al.
2023, §3.1 and Algorithm 1, line 4). Both directions are the same transition with the two ᾱ swapped, so one
function serves both, for ε-prediction (SD1.x, SD2-base) and v-prediction (SD2 768-v; Salimans & Ho 2022).

Conventions: ``alphas_cumprod[t]`` is ᾱ_t of the training schedule; ``timesteps`` are the inference
timesteps in sampling order (981, 961, …, 1 for SD1.x with T = 50). The step below timestep ``t`` is
``t − num_train_timesteps // T``; where that is negative ᾱ is the scheduler's final ᾱ. Every function takes
ᾱ as tensors, so a batch may hold rows at different timesteps: ᾱ of shape (B, 1, 1, 1) then gives each row
its own coefficients (continuous batching, ``slots.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")

# ---------------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DDIMSchedule:
    """The numbers a DDIM sampler needs: inference timesteps, cumulative alphas and what the model predicts."""

    timesteps: Tensor  # (T,) long, sampling order: descending
    alphas_cumprod: Tensor  # (num_train_timesteps,) float32
    final_alpha_cumprod: Tensor  # () float32; ᾱ used below timestep 0
    num_train_timesteps: int
    prediction_type: str = "epsilon"

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

    def alphas(self, t: Tensor) -> Tensor:
        """ᾱ for a tensor of timesteps (any shape), the final ᾱ where t < 0."""
        table = torch.cat([self.final_alpha_cumprod.reshape(1), self.alphas_cumprod])  # index 0 ↔ t < 0
        return table[(t.long().cpu() + 1).clamp_min(0)]


def schedule_from_scheduler(scheduler, num_steps: int) -> DDIMSchedule:
    """Builds the schedule from a diffusers ``DDIMScheduler`` (its ``set_timesteps`` picks the timesteps)."""
    if num_steps < 1:
        raise ValueError(f"num_ddim_steps must be >= 1, got {num_steps}")
    scheduler.set_timesteps(num_steps)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}")
    return DDIMSchedule(
        timesteps=scheduler.timesteps.clone().long(),
        alphas_cumprod=scheduler.alphas_cumprod.clone().float(),
        final_alpha_cumprod=torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).clone(),
        num_train_timesteps=int(scheduler.config.num_train_timesteps),
        prediction_type=prediction_type,
    )


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------


def ddim_transition(
    sample: Tensor, model_output: Tensor, alpha_from: Tensor, alpha_to: Tensor, prediction_type: str = "epsilon"
) -> Tensor:
    """Moves ``sample`` from noise level ᾱ_from to ᾱ_to along the DDIM ODE (eq. 12, η = 0).

    ε-prediction: x̂_0 = (z − √(1−ᾱ_from) ε) / √ᾱ_from;  v-prediction: x̂_0 = √ᾱ_from z − √(1−ᾱ_from) v,
    ε = √ᾱ_from v + √(1−ᾱ_from) z. Then z' = √ᾱ_to x̂_0 + √(1−ᾱ_to) ε. The operation order is diffusers'
    ``DDIMScheduler.step`` (and ``DDIMInverseScheduler.step``), so results agree to the last bit.
    ᾱ: () or broadcastable per row, e.g. (B, 1, 1, 1).
    """
    alpha_from = alpha_from.to(sample.device)
    alpha_to = alpha_to.to(sample.device)
    beta_from = 1 - alpha_from
    if prediction_type == "epsilon":
        pred_original = (sample - beta_from ** (0.5) * model_output) / alpha_from ** (0.5)
        pred_epsilon = model_output
    elif prediction_type == "v_prediction":
        pred_original = (alpha_from**0.5) * sample - (beta_from**0.5) * model_output
        pred_epsilon = (alpha_from**0.5) * model_output + (beta_from**0.5) * sample
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}")
    direction = (1 - alpha_to) ** (0.5) * pred_epsilon
    return alpha_to ** (0.5) * pred_original + direction


def ddim_step(schedule: DDIMSchedule, sample: Tensor, model_output: Tensor, t: int) -> Tensor:
    """One sampling step z_t → z_{t-1} (Algorithm 1, the map z_{t-1}(z̄_t, ∅_t, C))."""
    return ddim_transition(
        sample, model_output, schedule.alpha(t), schedule.alpha(schedule.prev_timestep(t)), schedule.prediction_type
    )


def ddim_inverse_step(schedule: DDIMSchedule, sample: Tensor, model_output: Tensor, t: int) -> Tensor:
    """One inversion step towards timestep ``t``: z_{t-1} → z_t, with the model evaluated at ``t`` on z_{t-1}.

    This is the authors' ``next_step``: the UNet runs at the destination timestep on the less noisy latent,
    and the start ᾱ is ᾱ[t − 1000/T] (the final ᾱ when negative).
    """
    return ddim_transition(
        sample, model_output, schedule.alpha(schedule.prev_timestep(t)), schedule.alpha(t), schedule.prediction_type
    )


def row_alphas(schedule: DDIMSchedule, t: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
    """(ᾱ_from, ᾱ_to), each (B, 1, 1, 1), for rows at timesteps ``t`` (B,): a sampling step t → t − T/1000
    (``inverse=False``) or an inversion step towards t (``inverse=True``)."""
    here = schedule.alphas(t).reshape(-1, 1, 1, 1)
    below = schedule.alphas(t - schedule.step_ratio).reshape(-1, 1, 1, 1)
    return (below, here) if inverse else (here, below)


def classifier_free_guidance(out_uncond: Tensor, out_cond: Tensor, guidance_scale: float) -> Tensor:
    """ε̃ = ε(∅) + w (ε(C) − ε(∅)) (Ho & Salimans 2022; Mokady et al. 2023 §3, eq. 2), on the raw model
    output (ε or v), as diffusers applies it before the scheduler's conversion."""
    return out_uncond + guidance_scale * (out_cond - out_uncond)
