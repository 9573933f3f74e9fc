"""Model families: everything that differs between Stable Diffusion variants, in one object per family.

The engine never asks which model it runs: it asks the model's ``Family`` how a prompt becomes the UNet's
conditioning, what "the null" ψ("") is, which parts of the null Null-text Inversion optimises, and how the
conditioning is handed to the UNet. Conditioning is a ``Cond``: a dict of batch-first tensors (SD1.x:
``{"prompt_embeds": (B, 77, 768)}``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Cond = dict[str, Tensor]
"""Named conditioning tensors, batch first: {"prompt_embeds": (B, L, D), …}."""


def cat_cond(conds: list[Cond]) -> Cond:
    """Concatenates conditionings along the batch: [(B₁, …), (B₂, …)] → (B₁ + B₂, …) per key."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_rows(cond: Cond, rows: Tensor | slice) -> Cond:
    """The rows ``rows`` of every tensor."""
    return {k: v[rows] for k, v in cond.items()}


def cond_to(cond: Cond, device=None, dtype=None) -> Cond:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in cond.items()}


@dataclass(frozen=True)
class Family:
    """SD1.x (and the embedded tiny model): one CLIP text encoder, ψ(P) = its last hidden state over 77
    max-length padded tokens; the null is ψ(""); NTI optimises the whole (77, D) null embedding."""

    name: str = "sd1"
    learnable: tuple[str, ...] = ("prompt_embeds",)
    """Keys of the null conditioning that Null-text Inversion optimises (the rest stay at the model's null)."""

    def encode_prompts(self, model, prompts: list[str]) -> Cond:
        from nti_lightning.text import encode_text

        return {"prompt_embeds": encode_text(model, prompts)}

    def null(self, model, batch_size: int = 1) -> Cond:
        """ψ("") repeated: the initial null ∅_T (Algorithm 1, line 6)."""
        return {k: v.expand(batch_size, *v.shape[1:]).clone() for k, v in self.encode_prompts(model, [""]).items()}

    def unet_kwargs(self, cond: Cond) -> dict:
        return {"encoder_hidden_states": cond["prompt_embeds"]}


SD1 = Family()
