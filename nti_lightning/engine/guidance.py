"""Per-step tensor math of the inverters NTI is compared with on PIE-Bench (pure functions, no model calls).

* Negative-prompt Inversion (NPI): Miyake et al., "Negative-prompt Inversion: Fast Image Inversion for Editing with
  Text-guided Diffusion Models", arXiv:2305.16807 (2023).
* Proximal guidance (ProxNPI): Han et al., "Improving Tuning-Free Real Image Editing with Proximal Guidance",
  WACV 2024, arXiv:2306.05414 — code github.com/phymhan/prompt-to-prompt (``run_npi.py``), reused verbatim in
  PIE-Bench's ``models/p2p/proximal_guidance_forward.py``.
* Direct Inversion: Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code", ICLR 2024
  (``direct_inversion_p2p_guidance_forward``).

The wiring into a DDIM sampling step is described in the module docstrings below and in docs/eval.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def npi_null(source_cond: torch.Tensor, uncond: torch.Tensor | None = None, interp: float = 0.0) -> torch.Tensor:
    """NPI's "null" embedding for every sampling step: the source prompt's embedding ψ(P_src) (Miyake et al. 2023).

    With ``interp`` > 0 (the authors' ``npi_interp``), a spherical interpolation from ψ(P_src) towards ψ("").
    The returned tensor replaces the null-text embedding at *every* step, so classifier-free guidance of the
    source branch collapses to ε(z_t, P_src) and DDIM inversion with P_src is undone without optimisation.
    """
    if interp <= 0.0:
        return source_cond.detach().clone()
    if uncond is None:
        raise ValueError("npi_null: interp > 0 needs the unconditional embedding")
    return slerp(interp, source_cond, uncond)


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per leading row (as the authors' ``slerp_tensor``), same shape as ``low``."""
    a, b = low.flatten(1).float(), high.flatten(1).float()
    omega = torch.acos((F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).clamp(-1, 1))
    so = torch.sin(omega).clamp(min=1e-8)
    out = (torch.sin((1 - t) * omega) / so)[:, None] * a + (torch.sin(t * omega) / so)[:, None] * b
    return out.reshape(low.shape).to(low.dtype)


@dataclass(frozen=True)
class ProxParams:
    """Proximal-guidance settings. Defaults = PIE-Bench's ProxNPI run (``run_editing_p2p.py``): ``proximal="l0"``,
    ``quantile=0.75``, ``use_inversion_guidance=True``, ``recon_lr=1``, ``recon_t=400``, ``dilate_mask=1``;
    the same as the authors' cat→dog example in ``run_npi.py`` (their default ``quantile`` is 0.7).
    """

    prox: str = "l0"
    quantile: float = 0.75
    recon_lr: float = 1.0
    recon_t: int = 400
    dilate: int = 1


def prox_threshold(delta: torch.Tensor, quantile: float) -> torch.Tensor:
    """τ: the ``quantile`` of |Δ| over the whole tensor (all batch rows); a negative value is a fixed τ = −quantile."""
    if quantile > 0:
        return delta.detach().abs().float().flatten().quantile(quantile).to(delta.dtype)
    return torch.tensor(-quantile, dtype=delta.dtype, device=delta.device)


def proximal_delta(delta: torch.Tensor, tau: torch.Tensor, prox: str = "l0") -> torch.Tensor:
    """Proximal step on the guidance difference Δ = ε_cond − ε_uncond, exactly as the authors' code.

    ``"l0"``: Δ − clamp(Δ, −τ, τ), i.e. 0 where |Δ| ≤ τ and Δ − τ·sign(Δ) elsewhere (the code's "l0"; mathematically
    a soft threshold). ``"l1"``: the code's further shift by τ of the survivors (Δ − 2τ·sign(Δ) where |Δ| > τ).
    """
    out = delta - delta.clamp(-tau, tau)
    if prox == "l0":
        return out
    if prox == "l1":
        out = torch.where(out > 0, out - tau, out)
        return torch.where(out < 0, out + tau, out)
    raise ValueError(f"prox must be 'l0' or 'l1', got {prox!r}")


def proximal_guidance(
    eps_uncond: torch.Tensor, eps_cond: torch.Tensor, w: float, params: ProxParams = ProxParams()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proximal guidance (Han et al. 2023): ε = ε_uncond + w·prox_τ(ε_cond − ε_uncond).

    Returns (ε, edit_mask): ``edit_mask`` is 1 where the proximal Δ still exceeds τ, dilated by ``params.dilate``
    pixels (max-pool), per batch row and latent channel — the region the inversion guidance leaves free.
    τ is computed over the whole (source, target) batch, as in the authors' code.
    """
    delta = eps_cond - eps_uncond
    tau = prox_threshold(delta, params.quantile)
    d = proximal_delta(delta, tau, params.prox)
    mask = (d.abs() > tau).to(eps_cond.dtype)
    if params.dilate > 0:
        r = int(params.dilate)
        mask = F.max_pool2d(mask, kernel_size=2 * r + 1, stride=1, padding=r)
    return eps_uncond + w * d, mask


def inversion_guidance(
    z_prev: torch.Tensor, z_star_prev: torch.Tensor, edit_mask: torch.Tensor, t: int, params: ProxParams = ProxParams()
) -> torch.Tensor:
    """ProxNPI's inversion guidance after the DDIM step: z ← z − lr·(z − z*_{t−1})·(1 − edit_mask) for t < recon_t.

    (A negative ``recon_t`` means t > −recon_t, as in the authors' code.) With lr = 1 the region outside the
    edit mask is replaced by the stored inversion latent z*_{t−1}.
    """
    active = (params.recon_t > 0 and t < params.recon_t) or (params.recon_t < 0 and t > -params.recon_t)
    if not active or params.recon_lr == 0:
        return z_prev
    return z_prev - params.recon_lr * (z_prev - z_star_prev.expand_as(z_prev)) * (1 - edit_mask)


def direct_inversion_offset(z_star_prev: torch.Tensor, z_prev: torch.Tensor) -> torch.Tensor:
    """Direct Inversion's per-step offset (Ju et al. 2024): z*_{t−1} − z_{t−1} for the source branch.

    ``z_prev`` is the source branch after the DDIM step from z*_t with the source prompt and guidance w;
    ``z_star_prev`` the DDIM-inversion latent of the same step.
    """
    return z_star_prev - z_prev


def apply_direct_inversion(latents: torch.Tensor, offset: torch.Tensor, source_rows: int = 1) -> torch.Tensor:
    """Add the offset to the first ``source_rows`` rows (the source branch); target rows are left untouched."""
    return torch.cat((latents[:source_rows] + offset[:source_rows], latents[source_rows:]), dim=0)
