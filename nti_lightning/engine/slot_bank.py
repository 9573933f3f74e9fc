"""``SlotBank``: the Lightning module of the continuous-batching engine (``slots.SlotEngine``).

Its learnable parameters are the null embeddings ∅_t of every slot and timestep (Mokady et al. 2023,
Algorithm 1: the output {∅_t}); its buffers are the per-slot tensors the batched steps read. ``training_step``
is Algorithm 1's line 9 for the rows of one grad call.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from nti_lightning.engine.ddim import classifier_free_guidance, ddim_transition, row_alphas
from nti_lightning.engine.nulltext import RowAdam, latent_mse
from nti_lightning.models.family import Cond


class SlotBank(L.LightningModule):
    """∅_t of every slot and timestep (the learnable parameters) and each slot's working tensors.

    null_embeddings[k]: (S, T, *shape) for every optimised key k of the conditioning (SD1.x: prompt_embeds,
    (S, T, 77, D)); index i ↔ timesteps[i]. Buffers: trajectory (S, T + 1, C, h, w) with [:, k] = z*_k;
    z_bar (S, C, h, w) = z̄_t; cond_out (S, C, h, w) = the conditional prediction at z̄_t; cond_<key>
    (S, …) = ψ(P); null_<key> (1, …) = the model's null; adam_m_<k>, adam_v_<k> (S, …); inner_steps (S, T);
    final_loss (S, T); with ``corrections`` (Direct Inversion) also corrections (S, T, C, h, w) = c_t."""

    def __init__(
        self, num_slots: int, num_steps: int, latent_shape: tuple, null: Cond, learnable: tuple, corrections=False
    ) -> None:
        super().__init__()
        S, T = num_slots, num_steps
        self.keys, self.learnable = tuple(null), tuple(learnable)
        self.null_embeddings = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros(S, T, *null[k].shape[1:]), requires_grad=False) for k in learnable}
        )
        self.register_buffer("trajectory", torch.zeros(S, T + 1, *latent_shape))
        self.register_buffer("z_bar", torch.zeros(S, *latent_shape))
        self.register_buffer("cond_out", torch.zeros(S, *latent_shape))
        for k, v in null.items():
            self.register_buffer(f"cond_{k}", torch.zeros(S, *v.shape[1:]))
            self.register_buffer(f"null_{k}", v[:1].detach().float().clone())
        for k in learnable:
            self.register_buffer(f"adam_m_{k}", torch.zeros(S, *null[k].shape[1:]))
            self.register_buffer(f"adam_v_{k}", torch.zeros(S, *null[k].shape[1:]))
        self.register_buffer("inner_steps", torch.zeros(S, T, dtype=torch.long))
        self.register_buffer("final_loss", torch.full((S, T), float("nan")))
        if corrections:
            self.register_buffer("corrections", torch.zeros(S, T, *latent_shape))
        self.adam_steps = torch.zeros(S, dtype=torch.long)  # host side: Adam's bias correction is computed there

    def cond(self, key: str) -> Tensor:
        return getattr(self, f"cond_{key}")

    def null(self, key: str) -> Tensor:
        return getattr(self, f"null_{key}")

    def adam(self, key: str) -> RowAdam:
        return RowAdam(getattr(self, f"adam_m_{key}"), getattr(self, f"adam_v_{key}"), self.adam_steps)

    def null_rows(self, slots: Tensor, steps: Tensor) -> Cond:
        """The null conditioning ∅_t of rows (slot, step index): optimised keys from the parameters, the others
        the model's null. → {key: (n, …)}"""
        n = len(slots)
        return {
            k: self.null_embeddings[k][slots, steps]
            if k in self.learnable
            else self.null(k).expand(n, *self.null(k).shape[1:])
            for k in self.keys
        }

    def training_step(self, batch: dict, batch_idx: int = 0) -> Tensor:
        """Algorithm 1, line 9 for the rows of one grad call: per-row ‖z*_{t−1} − z_{t−1}(z̄_t, ∅_t, C)‖² → (n,).

        batch: denoise, schedule, guidance_scale, z (n, C, h, w) = z̄_t, t (n,), null {key: (n, …)} (leaves with
        grad for the optimised keys), cond_out (n, C, h, w), target (n, C, h, w) = z*_{t−1}."""
        schedule = batch["schedule"]
        out_uncond = batch["denoise"](batch["z"], batch["t"], batch["null"])  # (n, C, h, w)
        guided = classifier_free_guidance(out_uncond, batch["cond_out"], batch["guidance_scale"])
        alpha_t, alpha_prev = row_alphas(schedule, batch["t"])
        z_prev = ddim_transition(batch["z"], guided, alpha_t, alpha_prev, schedule.prediction_type)
        return latent_mse(z_prev, batch["target"])  # (n,)
