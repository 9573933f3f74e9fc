"""Null-text optimisation rules (Mokady et al. 2023, Algorithm 1, lines 8–11, and §4's implementation details).

Small pure pieces, each used by ``algorithm.py`` (the per-image control flow) and ``slots.py`` (the batched
execution):

- ``null_text_lr`` and ``early_stop_threshold``: the authors' schedule lr = 1e-2·(1 − i/100) and their inner
  loop's stopping rule loss < 1e-5 + i·2e-5;
- ``latent_mse``: the loss ‖z*_{t−1} − z_{t−1}(z̄_t, ∅_t, C)‖² as a mean over the latent, one per image;
- ``RowAdam``: Adam (Kingma & Ba 2015) over the rows of a batch, each row with its own moments, step count and
  learning rate — the paper's "fresh Adam per timestep" for every image of a continuous batch, with the
  arithmetic of ``torch.optim.Adam`` in the same order (bit-identical to running it on one image alone);
- ``DynamicLossScale``: 16-mixed's loss scaling with a per-row overflow test, so an image whose gradients
  overflow skips its own step and no other image's.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# Schedule and loss
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


# ---------------------------------------------------------------------------------------------------------
# Adam per row
# ---------------------------------------------------------------------------------------------------------


class RowAdam:
    """Adam over ``num_rows`` independent rows of parameters of shape ``shape``.

    Row r has its own first/second moments and step count; ``reset(rows)`` starts a fresh Adam for those rows
    (Algorithm 1: a new optimiser per timestep). ``step`` updates only the rows given, each with its own
    learning rate. The operations and their order are ``torch.optim.Adam``'s single-tensor path (betas 0.9,
    0.999, ε 1e-8, no weight decay), so a row's numbers equal ``torch.optim.Adam`` run on that row alone.
    The moments are buffers of the caller's module (``slot_bank.SlotBank``), passed in, so they are checkpointed
    and moved with it.
    """

    def __init__(self, exp_avg: Tensor, exp_avg_sq: Tensor, steps: Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.exp_avg = exp_avg  # (R, *shape)
        self.exp_avg_sq = exp_avg_sq  # (R, *shape)
        self.steps = steps  # (R,) long, on the host
        self.beta1, self.beta2 = betas
        self.eps = eps

    def reset(self, rows: Tensor) -> None:
        self.exp_avg[rows.to(self.exp_avg.device)] = 0
        self.exp_avg_sq[rows.to(self.exp_avg.device)] = 0
        self.steps[rows.cpu()] = 0

    def step(self, param: Tensor, grad: Tensor, rows: Tensor, lr: list[float]) -> Tensor:
        """Returns param − Adam's update for rows ``rows`` (n,), given their parameters ``param`` (n, *shape),
        gradients ``grad`` (n, *shape) and learning rates ``lr`` (n floats). Updates the moments in place."""
        dev_rows = rows.to(self.exp_avg.device)
        host_rows = rows.cpu()
        self.steps[host_rows] += 1
        step = self.steps[host_rows].tolist()
        exp_avg = self.exp_avg[dev_rows].lerp_(grad, 1 - self.beta1)
        exp_avg_sq = self.exp_avg_sq[dev_rows].mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        self.exp_avg[dev_rows] = exp_avg
        self.exp_avg_sq[dev_rows] = exp_avg_sq
        # torch.optim.Adam computes these in double on the host and casts them to the parameter's dtype
        neg_step_size = [-lr_r / (1 - self.beta1**s) for lr_r, s in zip(lr, step)]
        bias_correction2_sqrt = [(1 - self.beta2**s) ** 0.5 for s in step]
        view = (-1,) + (1,) * (param.dim() - 1)
        neg_step_size_t = torch.tensor(neg_step_size, dtype=param.dtype).to(param.device).view(view)
        bc2_t = torch.tensor(bias_correction2_sqrt, dtype=param.dtype).to(param.device).view(view)
        denom = (exp_avg_sq.sqrt() / bc2_t).add_(self.eps)
        return param + neg_step_size_t * exp_avg / denom  # addcdiv_'s order: value · t1 / t2, then the add


# ---------------------------------------------------------------------------------------------------------
# Loss scaling for 16-mixed, per row
# ---------------------------------------------------------------------------------------------------------


class DynamicLossScale:
    """``torch.amp.GradScaler``'s dynamic scale (init 2¹⁶, ×0.5 on overflow, ×2 after 2000 clean steps), with
    the overflow test per row: a row whose gradients are not finite skips its step (not charged to its N inner
    steps); the other rows step. A step that overflows anywhere halves the scale."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale = init_scale
        self.growth_interval = growth_interval
        self.clean_steps = 0

    def unscale(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        """grad (n, …) of the scaled loss → (unscaled grad, finite (n,) bool)."""
        grad = grad * torch.tensor(1.0 / self.scale, dtype=grad.dtype, device=grad.device)
        finite = torch.isfinite(grad.flatten(1)).all(dim=1)
        return grad, finite

    def update(self, all_finite: bool) -> None:
        if not all_finite:
            self.scale *= 0.5
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= 2.0
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
