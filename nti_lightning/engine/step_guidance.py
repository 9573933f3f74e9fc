"""What reconstruction and editing apply at each sampling step besides classifier-free guidance, read from a record.

``sampling.ddim_sample`` takes an optional ``StepGuidance``: ``combine`` turns the two UNet outputs into the
prediction (default: ε(∅) + w·(ε(C) − ε(∅))), ``after_step`` may change the latent after the DDIM step and
before a Prompt-to-Prompt callback (local blend). ``record_guidance`` builds it from ``meta["sampling"]``
(written by ``inverters.py``); records without it (ddim, nti, npi) sample with plain guidance.

* ``"proximal"`` (proxnpi; Han et al., "Improving Tuning-Free Real Image Editing with Proximal Guidance", WACV
  2024): at **edit** time only, Δ = ε(C) − ε(∅) goes through the proximal operator with τ = a quantile of |Δ|
  over the image's whole edit batch, ε = ε(∅) + w·prox_τ(Δ); after the step, for t < recon_t, the latent is
  pulled towards the pivot z*_{t−1} outside the dilated mask |prox_τ(Δ)| > τ (inversion guidance). The
  reconstruction pass is plain guidance with the NPI null, as in the authors' and PIE-Bench's code.
* ``"direct"`` (Ju et al., "PnP Inversion", ICLR 2024): after each step the record's correction c_t is added to
  each image's **source** row (the reconstruction, or row 0 of an edit); target rows are untouched.

The per-step math is ``eval.guidance`` (pure functions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from nti_lightning.engine.ddim import classifier_free_guidance
from nti_lightning.engine.guidance import ProxParams, inversion_guidance, proximal_guidance


class StepGuidance(Protocol):
    def combine(self, i: int, t: int, out_uncond: Tensor, out_cond: Tensor, w: float) -> Tensor: ...

    def after_step(self, i: int, t: int, z: Tensor) -> Tensor: ...


class DirectInversionGuidance:
    """Adds c_t (rows, T, C, h, w; zero for target rows) to every row after step i."""

    def __init__(self, corrections: Tensor) -> None:
        self.corrections = corrections

    def combine(self, i: int, t: int, out_uncond: Tensor, out_cond: Tensor, w: float) -> Tensor:
        return classifier_free_guidance(out_uncond, out_cond, w)

    def after_step(self, i: int, t: int, z: Tensor) -> Tensor:
        return z + self.corrections[:, i].to(z.device)


class ProximalGuidance:
    """Proximal guidance + inversion guidance for batches of ``group`` rows per image (its [source, targets])."""

    def __init__(self, z_star: Tensor, group: int, params: ProxParams) -> None:
        self.z_star, self.group, self.params = z_star, group, params  # z_star: (rows, T + 1, C, h, w)
        self.mask: Tensor | None = None

    def combine(self, i: int, t: int, out_uncond: Tensor, out_cond: Tensor, w: float) -> Tensor:
        eps, masks = [], []
        for a in range(0, out_cond.shape[0], self.group):  # τ over one image's rows, as the authors' batch
            e, m = proximal_guidance(out_uncond[a : a + self.group], out_cond[a : a + self.group], w, self.params)
            eps.append(e)
            masks.append(m)
        self.mask = torch.cat(masks)
        return torch.cat(eps)

    def after_step(self, i: int, t: int, z: Tensor) -> Tensor:
        target = self.z_star[:, self.z_star.shape[1] - 2 - i].to(z.device)  # z*_{t−1}
        return inversion_guidance(z, target, self.mask, t, self.params)


def prox_params(sampling: dict) -> ProxParams:
    return ProxParams(
        prox=sampling["operator"],
        quantile=float(sampling["quantile"]),
        recon_lr=float(sampling["recon_lr"]),
        recon_t=int(sampling["recon_t"]),
        dilate=int(sampling["dilate"]),
    )


def _per_row(tensors: list[Tensor], rows_per_image: int, source_only: bool) -> Tensor:
    """One record tensor per image → (images · rows_per_image, …): repeated per row, or zero for target rows."""
    out = []
    for x in tensors:
        for r in range(rows_per_image):
            out.append(torch.zeros_like(x) if source_only and r > 0 else x)
    return torch.stack(out)


def record_guidance(inversions: Sequence, rows_per_image: int = 1, edit: bool = False) -> StepGuidance | None:
    """The step guidance of a batch of records laid out as ``rows_per_image`` rows per image, source row first
    (reconstruction: 1; a P2P edit of one image: 1 + targets); None for plain classifier-free guidance."""
    kinds = {(inv.meta.get("sampling") or {}).get("kind") for inv in inversions}
    if len(kinds) != 1:
        raise ValueError(f"cannot sample records of different methods in one batch ({sorted(map(str, kinds))})")
    kind = kinds.pop()
    if kind is None:
        return None
    if kind == "direct":
        missing = [k for k, inv in enumerate(inversions) if inv.corrections is None]
        if missing:
            raise ValueError(f"direct-inversion record(s) {missing} hold no corrections (saved without them?)")
        return DirectInversionGuidance(_per_row([inv.corrections for inv in inversions], rows_per_image, True))
    if kind == "proximal":
        if not edit:
            return None  # the reconstruction pass is plain guidance (Han et al.'s and PIE-Bench's code)
        z_star = _per_row([inv.trajectory for inv in inversions], rows_per_image, False)
        return ProximalGuidance(z_star, rows_per_image, prox_params(inversions[0].meta["sampling"]))
    raise ValueError(f"unknown sampling kind {kind!r} in the record (made by a newer nti_lightning?)")
