"""Null-text optimisation rules (Mokady et al. 2023, Algorithm 1, lines 8–11, and §4's implementation details).

Small pure pieces, each used by ``algorithm.py`` (the per-image control flow) and ``slots.py`` (the batched
execution):

- ``null_text_lr`` and ``early_stop_threshold``: the authors' schedule lr = 1e-2·(1 − i/100) and their inner
  loop's stopping rule loss < 1e-5 + i·2e-5;
- ``latent_mse``: the loss ‖z*_{t−1} − z_{t−1}(z̄_t, ∅_t, C)‖² as a mean over the latent, one per image;
- ``RowAdam``: a ``torch.optim.Optimizer`` — Adam (Kingma & Ba 2015) over the rows of its parameters, each row
  (an image's slot) with its own moments, step count and learning rate: the paper's "fresh Adam per timestep"
  for every image of a continuous batch, with the arithmetic of ``torch.optim.Adam`` in the same order
  (bit-identical to running it on one image alone);
- ``RowLossScaler``: 16-mixed's loss scaling as the scaler of Lightning's ``MixedPrecision`` plugin, with the
  overflow test per row, so an image whose gradients overflow skips its own step and no other image's.
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


class RowAdam(torch.optim.Optimizer):
    """Adam over the rows of its parameters (each of shape (R, *shape), R = slots): row r has its own moments,
    step count and learning rate.

    ``reset(rows)`` starts a fresh Adam for those rows (Algorithm 1: a new optimiser per timestep). Before each
    ``step()``, ``select(rows, lr, apply)`` names the rows the step updates — the images of the UNet call — with
    their learning rates; rows whose ``apply`` is false (a non-finite loss, or gradients that overflowed under
    16-mixed) keep their parameters, moments and step count. The operations and their order are
    ``torch.optim.Adam``'s single-tensor path (betas 0.9, 0.999, ε 1e-8, no weight decay), so a row's numbers
    equal ``torch.optim.Adam`` run on that row alone. The step count is per row and shared by the parameters
    (SDXL optimises two keys: one Adam step per inner step for both, as ``torch.optim.Adam`` over both)."""

    def __init__(self, params, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, {"betas": betas, "eps": eps, "lr": 0.0})
        group = self.param_groups[0]["params"]
        self.num_rows = int(group[0].shape[0])
        for p in group:
            self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.steps = torch.zeros(self.num_rows, dtype=torch.long)  # host side: bias corrections are computed there
        self._rows: Tensor | None = None
        self._lr: list[float] = []
        self.applied: Tensor | None = None  # (n,) bool: which selected rows the last step updated

    @property
    def params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    def reset(self, rows: Tensor) -> None:
        for p in self.params:
            dev = rows.to(p.device)
            self.state[p]["exp_avg"][dev] = 0
            self.state[p]["exp_avg_sq"][dev] = 0
        self.steps[rows.cpu()] = 0

    def select(self, rows: Tensor, lr: list[float], apply: Tensor) -> None:
        """The rows (n,) the next ``step`` updates, their learning rates and which of them may step."""
        self._rows, self._lr, self.applied = rows, list(lr), apply.cpu().clone()

    def unscale_rows(self, inv_scale: float) -> Tensor:
        """Multiplies the selected rows' gradients by ``inv_scale``; marks a row whose gradients are not finite as
        not applied. → (n,) bool, finite per row (16-mixed, ``RowLossScaler``)."""
        finite = torch.ones(len(self._rows), dtype=torch.bool)
        for p in self.params:
            rows = self._rows.to(p.device)
            g = p.grad[rows] * torch.tensor(inv_scale, dtype=p.grad.dtype, device=p.device)
            p.grad[rows] = g
            finite &= torch.isfinite(g.flatten(1)).all(dim=1).cpu()
        self.applied &= finite
        return finite

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam step for every selected row that applies (see the class docstring)."""
        if self._rows is None:
            raise RuntimeError("RowAdam.step() without select(rows, lr, apply)")
        idx = self.applied.nonzero().squeeze(1)
        if len(idx) == 0:
            return None
        beta1, beta2 = self.param_groups[0]["betas"]
        eps = self.param_groups[0]["eps"]
        host_rows = self._rows.cpu()[idx]
        self.steps[host_rows] += 1
        step = self.steps[host_rows].tolist()
        lr = [self._lr[j] for j in idx.tolist()]
        # torch.optim.Adam computes these in double on the host and casts them to the parameter's dtype
        neg_step_size = [-lr_r / (1 - beta1**s) for lr_r, s in zip(lr, step)]
        bias_correction2_sqrt = [(1 - beta2**s) ** 0.5 for s in step]
        for p in self.params:
            rows = host_rows.to(p.device)
            grad, param = p.grad[rows], p[rows]
            state = self.state[p]
            exp_avg = state["exp_avg"][rows].lerp_(grad, 1 - beta1)
            exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            state["exp_avg"][rows] = exp_avg
            state["exp_avg_sq"][rows] = exp_avg_sq
            view = (-1,) + (1,) * (param.dim() - 1)
            neg_step_size_t = torch.tensor(neg_step_size, dtype=param.dtype).to(param.device).view(view)
            bc2_t = torch.tensor(bias_correction2_sqrt, dtype=param.dtype).to(param.device).view(view)
            denom = (exp_avg_sq.sqrt() / bc2_t).add_(eps)
            p[rows] = param + neg_step_size_t * exp_avg / denom  # addcdiv_'s order: value · t1 / t2, then the add
        return None

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["row_steps"] = self.steps.clone()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.steps.copy_(state_dict.pop("row_steps"))
        super().load_state_dict(state_dict)


# ---------------------------------------------------------------------------------------------------------
# Loss scaling for 16-mixed, per row
# ---------------------------------------------------------------------------------------------------------


class RowLossScaler:
    """The scaler of Lightning's ``MixedPrecision("16-mixed", …, scaler=RowLossScaler())``: ``torch.amp.GradScaler``'s
    dynamic scale (init 2¹⁶, ×0.5 on overflow, ×2 after 2000 clean steps) with the overflow test per row — a
    ``torch.amp.GradScaler`` skips the step of every image when one overflows. Fabric calls ``scale`` in
    ``fabric.backward`` and ``step``/``update`` in the optimiser's step; a row whose gradients are not finite
    keeps its parameters (``RowAdam.unscale_rows``), and is not charged to its N inner steps."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale_value = init_scale
        self.growth_interval = growth_interval
        self.clean_steps = 0
        self._overflow = False

    def scale(self, loss: Tensor) -> Tensor:
        return loss * self.scale_value

    def step(self, optimizer: RowAdam, **kwargs):
        had = optimizer.applied.clone()  # rows with a finite loss
        finite = optimizer.unscale_rows(1.0 / self.scale_value)
        self._overflow = not bool(finite[had].all())
        return optimizer.step(**kwargs)

    def update(self) -> None:
        if self._overflow:
            self.scale_value *= 0.5
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale_value *= 2.0
            self.clean_steps = 0

    def unscale_(self, optimizer) -> None:
        raise NotImplementedError("RowLossScaler unscales per row inside step(); gradient clipping is not used")

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
