"""``SlotBank``: the Lightning module of the continuous-batching engine (``slots.SlotEngine``).

Its learnable parameters are the null embeddings being optimised, ∅_t of every slot's current timestep
(Mokady et al. 2023, Algorithm 1, line 9: ∅_t ← ∅_t − η∇…), optimised by ``nulltext.RowAdam`` through
Fabric; its buffers are the per-slot tensors the batched steps read, the {∅_t} each optimisation leaves (the
algorithm's output, line 13) among them. ``training_step`` is line 9's loss for the rows of one grad call.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from nti_lightning.engine.ddim import classifier_free_guidance, ddim_transition, row_alphas
from nti_lightning.engine.nulltext import latent_mse
from nti_lightning.models.family import Cond


class SlotBank(L.LightningModule):
    """The nulls being optimised (the learnable parameters) and each slot's working tensors.

    Parameters: ``working[k]`` (S, *shape) = ∅_t of each slot's current timestep for every optimised key k of
    the conditioning (SD1.x: prompt_embeds, (S, 77, D)). Buffers: ``nulls_<k>`` (S, T, *shape) = {∅_t}, index
    i ↔ timesteps[i], each written when its timestep is done; trajectory (S, T + 1, C, h, w) with [:, k] = z*_k;
    z_bar (S, C, h, w) = z̄_t; cond_out (S, C, h, w) = the conditional prediction at z̄_t; cond_<key> (S, …) =
    ψ(P); null_<key> (1, …) = the model's null; inner_steps (S, T); final_loss (S, T); with ``corrections``
    (Direct Inversion) also corrections (S, T, C, h, w) = c_t."""

    def __init__(
        self, num_slots: int, num_steps: int, latent_shape: tuple, null: Cond, learnable: tuple, corrections=False
    ) -> None:
        super().__init__()
        S, T = num_slots, num_steps
        self.keys, self.learnable = tuple(null), tuple(learnable)
        self.working = nn.ParameterDict({k: nn.Parameter(torch.zeros(S, *null[k].shape[1:])) for k in learnable})
        for k in learnable:
            self.register_buffer(f"nulls_{k}", torch.zeros(S, T, *null[k].shape[1:]))
        self.register_buffer("trajectory", torch.zeros(S, T + 1, *latent_shape))
        self.register_buffer("z_bar", torch.zeros(S, *latent_shape))
        self.register_buffer("cond_out", torch.zeros(S, *latent_shape))
        for k, v in null.items():
            self.register_buffer(f"cond_{k}", torch.zeros(S, *v.shape[1:]))
            self.register_buffer(f"null_{k}", v[:1].detach().float().clone())
        self.register_buffer("inner_steps", torch.zeros(S, T, dtype=torch.long))
        self.register_buffer("final_loss", torch.full((S, T), float("nan")))
        if corrections:
            self.register_buffer("corrections", torch.zeros(S, T, *latent_shape))

    @property
    def null_embeddings(self) -> dict[str, Tensor]:
        """{key: (S, T, …)}: the {∅_t} of every slot."""
        return {k: getattr(self, f"nulls_{k}") for k in self.learnable}

    def cond(self, key: str) -> Tensor:
        return getattr(self, f"cond_{key}")

    def null(self, key: str) -> Tensor:
        return getattr(self, f"null_{key}")

    def null_rows(self, slots: Tensor, steps: Tensor, optimising: bool = False) -> Cond:
        """The null conditioning of rows (slot, step index): optimised keys from the parameters being optimised
        (``optimising``: an inner step, with grad) or from the finished {∅_t}; the others the model's null.
        → {key: (n, …)}"""
        n = len(slots)
        out = {}
        for k in self.keys:
            if k not in self.learnable:
                out[k] = self.null(k).expand(n, *self.null(k).shape[1:])
            elif optimising:
                out[k] = self.working[k][slots]
            else:
                out[k] = self.null_embeddings[k][slots, steps]
        return out

    def training_step(self, batch: dict, batch_idx: int = 0) -> Tensor:
        """Algorithm 1, line 9 for the rows of one grad call: per-row ‖z*_{t−1} − z_{t−1}(z̄_t, ∅_t, C)‖² → (n,).

        batch: denoise, schedule, guidance_scale, z (n, C, h, w) = z̄_t, t (n,), null {key: (n, …)} (gathered from
        the parameters), cond_out (n, C, h, w), target (n, C, h, w) = z*_{t−1}."""
        schedule = batch["schedule"]
        out_uncond = batch["denoise"](batch["z"], batch["t"], batch["null"])  # (n, C, h, w)
        guided = classifier_free_guidance(out_uncond, batch["cond_out"], batch["guidance_scale"])
        alpha_t, alpha_prev = row_alphas(schedule, batch["t"])
        z_prev = ddim_transition(batch["z"], guided, alpha_t, alpha_prev, schedule.prediction_type)
        return latent_mse(z_prev, batch["target"])  # (n,)
