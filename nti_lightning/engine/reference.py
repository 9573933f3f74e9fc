"""The authors' null-text loop, written plainly: the reference the batched engine is timed and checked against.

This follows the structure of ``NullInversion`` in the authors' ``null_text_w_ptp.ipynb`` (Mokady et al.
2023), one image at a time, in float32:

- the pivot: DDIM inversion with the conditional branch only (Algorithm 1, lines 3–4);
- per timestep a fresh Adam on a copy of the previous ∅ (line 11) with lr 1e-2·(1 − i/100);
- the conditional ε once per timestep without grad, then up to N inner steps of the unconditional branch
  with grad (line 9), the early-stop test after ``optimizer.step()`` with the loss from before it;
- z̄_{t−1} from one batched [∅_t, C] call: the conditional branch recomputed;
- as distributed (``weights_grad=True``, ``classic_attention=`` a processor per layer): the UNet weights keep
  ``requires_grad=True``, so every backward also fills (and accumulates) weight gradients nobody uses, and
  every attention layer runs the authors' hook (``register_attention_control``: an explicit
  softmax(QKᵀ/√d) — here ``p2p.P2PAttnProcessor`` with an identity controller, the same operations);
  ``weights_grad=False, classic_attention=None`` is their loop with frozen weights and fused attention.

The arithmetic is the package's own pure functions (``nti_lightning.engine.ddim``), so the engine can be checked
against it bit for bit where it does the same operations. It exists to be measured, not used.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nti_lightning.config import InversionConfig
from nti_lightning.engine.ddim import classifier_free_guidance, ddim_inverse_step, ddim_step, schedule_from_scheduler
from nti_lightning.engine.nulltext import early_stop_threshold, latent_mse, null_text_lr
from nti_lightning.engine.sampling import encode_latents
from nti_lightning.models.attention_dispatch import stock_attention_dispatch
from nti_lightning.text import encode_null, encode_text


@dataclass
class BaselineResult:
    """One image's inversion by the authors' loop."""

    null_embeddings: Tensor  # (T, L, D)
    pivot_z0: Tensor  # (C, h, w): z*_0, the image latent the reconstruction aims at
    z_T: Tensor  # (C, h, w): the pivot's end, where sampling starts
    z_0: Tensor  # (C, h, w): z̄_0, the reconstruction latent left by the loop
    inner_steps: Tensor  # (T,) long: Adam steps taken per timestep
    unet_calls: dict[str, int] = field(default_factory=dict)  # evaluations by kind (the pivot included)


@contextmanager
def _as_distributed(unet, weights_grad: bool, classic_attention):
    """The UNet as the authors' code runs it, restored afterwards: weight gradients on (``weights_grad``) and
    every attention layer through an explicit-softmax hook (``classic_attention``: layer name → its processor,
    e.g. Prompt-to-Prompt's ``P2PAttnProcessor`` with an identity controller, as their code registers one)."""
    frozen = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(weights_grad)  # as distributed: backward also computes every weight gradient
    processors = unet.attn_processors
    if classic_attention:
        unet.set_attn_processor({n: classic_attention(n) for n in processors})
    try:
        with stock_attention_dispatch(unet):  # diffusers' Attention.forward, as their code gets it
            yield
    finally:
        if classic_attention:
            unet.set_attn_processor(processors)
        for p, flag in zip(unet.parameters(), frozen):
            p.requires_grad_(flag)
            p.grad = None


def _pivot(eps, schedule, z0: Tensor, cond: Tensor, calls: dict) -> list[Tensor]:
    """DDIM inversion with w = 1 (the authors' ``ddim_loop``): [z*_0, …, z*_T], each (1, 4, h, w)."""
    latents = [z0]
    z = z0
    T = schedule.num_steps
    with torch.no_grad():
        for k in range(T):
            t = schedule.timesteps[T - k - 1]
            z = ddim_inverse_step(schedule, z, eps(z, t, cond), int(t))
            latents.append(z)
            calls["pivot"] += 1
    return latents


def _optimise_null(eps, schedule, i, z_cur, z_target, cond, uncond, cfg, calls) -> tuple[Tensor, int, Tensor]:
    """Timestep index i of ``null_optimization``: a fresh Adam on a copy of ∅, up to N inner steps against
    z*_{t−1}, the early-stop test after ``optimizer.step()``. → (∅_t (1, L, D), steps taken, ε(z̄_t, C))."""
    uncond = uncond.clone().detach()
    uncond.requires_grad = True
    optimizer = torch.optim.Adam([uncond], lr=null_text_lr(cfg.learning_rate, i, cfg.lr_decay_horizon))
    t = schedule.timesteps[i]
    with torch.no_grad():
        eps_cond = eps(z_cur, t, cond)
        calls["cond"] += 1
    threshold = early_stop_threshold(cfg.early_stop_epsilon, cfg.early_stop_slope, i)
    steps = 0
    for _ in range(cfg.num_inner_steps):
        eps_uncond = eps(z_cur, t, uncond)
        calls["uncond_grad"] += 1
        z_prev = ddim_step(schedule, z_cur, classifier_free_guidance(eps_uncond, eps_cond, cfg.guidance_scale), int(t))
        loss = latent_mse(z_prev, z_target).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        loss_item = loss.item()
        if not torch.isfinite(torch.tensor(loss_item)):
            raise FloatingPointError(f"baseline: non-finite loss at timestep index {i}")
        if cfg.early_stop and loss_item < threshold:
            break
    return uncond, steps, eps_cond


@torch.no_grad()
def _advance(eps, schedule, t, latent: Tensor, cond, uncond, eps_cond, cfg, calls: dict, recompute_cond: bool):
    """z̄_{t−1} from the optimised ∅_t (``get_noise_pred``): as distributed, both branches again in one batched
    call; else the timestep's conditional ε reused and one unconditional call."""
    if recompute_cond:
        context = torch.cat([uncond, cond])  # (2, L, D)
        eps_uncond, eps_cond = eps(torch.cat([latent] * 2), t, context).chunk(2)
        calls["final_batched"] += 1
    else:
        eps_uncond = eps(latent, t, uncond)
        calls["uncond"] = calls.get("uncond", 0) + 1
    return ddim_step(schedule, latent, classifier_free_guidance(eps_uncond, eps_cond, cfg.guidance_scale), int(t))


def baseline_invert(
    model,
    pixels: Tensor,
    prompt: str,
    cfg: InversionConfig,
    weights_grad: bool = True,
    classic_attention=None,
    recompute_cond: bool = True,
) -> BaselineResult:
    """Null-text-inverts one image (pixels: (1, 3, H, W) in [-1, 1]) the way the authors' code does.

    ``cfg.batch_size`` is ignored: the loop is the authors' (one image). ``recompute_cond=False`` reuses the
    timestep's conditional ε for z̄_{t−1} (one unconditional call instead of a batched pair): the package's
    call structure, with ``torch.optim.Adam`` — the reference the slot engine's per-row Adam is tested against.
    """
    if pixels.shape[0] != 1:
        raise ValueError(f"the baseline inverts one image at a time, got a batch of {pixels.shape[0]}")
    unet = model.unet
    calls = {"pivot": 0, "cond": 0, "uncond_grad": 0, "final_batched": 0}

    def eps(z: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return unet(z, t, encoder_hidden_states=context, return_dict=False)[0].float()

    with _as_distributed(unet, weights_grad, classic_attention):
        # 1. Image and text: z*_0, C = ψ(P), ∅ = ψ("")
        z0 = encode_latents(model, pixels.to(model.device))  # (1, 4, h, w)
        cond = encode_text(model, [prompt]).to(z0.device)  # (1, L, D)
        uncond = encode_null(model, 1).to(z0.device)  # (1, L, D)
        schedule = schedule_from_scheduler(model.scheduler, cfg.num_ddim_steps)
        T = schedule.num_steps

        # 2. The pivot: DDIM inversion with w = 1 (``ddim_loop``)
        latents = _pivot(eps, schedule, z0, cond, calls)

        # 3. Null-text optimisation (``null_optimization``), then z̄_{t−1} from the optimised ∅_t
        null_list = []
        inner_steps = torch.zeros(T, dtype=torch.long)
        latent_cur = latents[-1]
        for i in range(T):
            t = schedule.timesteps[i]
            uncond, inner_steps[i], eps_cond = _optimise_null(
                eps, schedule, i, latent_cur, latents[T - i - 1], cond, uncond, cfg, calls
            )
            null_list.append(uncond[:1].detach())
            latent_cur = _advance(eps, schedule, t, latent_cur, cond, uncond, eps_cond, cfg, calls, recompute_cond)
    return BaselineResult(
        null_embeddings=torch.cat(null_list).cpu(),  # (T, L, D)
        pivot_z0=z0[0].cpu(),
        z_T=latents[-1][0].cpu(),
        z_0=latent_cur[0].detach().cpu(),
        inner_steps=inner_steps,
        unet_calls=calls,
    )
