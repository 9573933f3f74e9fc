"""Model families: everything that differs between Stable Diffusion variants, in one object per model.

The engine never asks which model it runs: it asks the model's ``Family`` how a prompt becomes the UNet's
conditioning, what "the null" ψ("") is, which parts of the null Null-text Inversion optimises, how the
conditioning is handed to the UNet, what the UNet predicts (ε, or v = √ᾱ ε − √(1 − ᾱ) x₀ of Salimans & Ho
2022), the native image size, the VAE's latent scaling and the cross-attention layout Prompt-to-Prompt edits.
Conditioning is a ``Cond``: a dict of batch-first tensors (SD1.x: ``{"prompt_embeds": (B, 77, 768)}``, SD2.x:
``(B, 77, 1024)``).

``family_from_configs`` reads a family off a model's component configs (see ``models/detect.py`` for the
folder checks around it):

- SD1.x: CLIP ViT-L text encoder (768), 1×1-conv transformer projections, one head count for every block,
  ε-prediction, 512 px;
- SD2.x: OpenCLIP ViT-H text encoder (1024; diffusers keeps its first 23 layers, so ψ is still "the last
  hidden state"), linear transformer projections, a head size per block, a tokenizer padding with "!";
  512-base predicts ε, 768-v predicts v (``sd2-v``).

Both compute ψ(P) the same way (StableDiffusionPipeline.encode_prompt: max-length padding, last hidden
state), so one ``Family`` class serves both; the differences are data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Cond = dict[str, Tensor]
"""Named conditioning tensors, batch first: {"prompt_embeds": (B, L, D), …}."""

PREDICTION_TYPES = ("epsilon", "v_prediction")


def cat_cond(conds: list[Cond]) -> Cond:
    """Concatenates conditionings along the batch: [(B₁, …), (B₂, …)] → (B₁ + B₂, …) per key."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_rows(cond: Cond, rows: Tensor | slice) -> Cond:
    """The rows ``rows`` of every tensor."""
    return {k: v[rows] for k, v in cond.items()}


def cond_to(cond: Cond, device=None, dtype=None) -> Cond:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in cond.items()}


@dataclass(frozen=True)
class AttentionLayout:
    """The UNet's cross-attention as Prompt-to-Prompt sees it (Hertz et al. 2022, §3).

    context_length: key positions of a cross-attention map (the tokenizer's max length, 77);
    text_width: the keys' input width (``cross_attention_dim``: 768 SD1.x, 1024 SD2.x);
    heads: attention heads per down block (SD1.x: 8 everywhere; SD2.x: 5, 10, 20, 20 — 64 channels a head);
    linear_projection: SD2.x's transformers project in/out with Linear rather than 1×1 Conv (the maps are
    the same (batch·heads, h·w, keys) either way)."""

    context_length: int = 77
    text_width: int = 768
    heads: tuple[int, ...] = (8, 8, 8, 8)
    linear_projection: bool = False


@dataclass(frozen=True)
class Family:
    """One Stable Diffusion variant: SD1.x (``sd1``), SD2.x-base (``sd2``), SD2.x 768-v (``sd2-v``).

    ψ(P) is the text encoder's last hidden state over max-length padded tokens; the null is ψ(""), padded
    the model's own way (CLIP pads with <|endoftext|>, OpenCLIP with "!"); NTI optimises the whole (77, D)
    null embedding."""

    name: str = "sd1"
    prediction_type: str = "epsilon"
    """What the UNet predicts: "epsilon" (Ho et al. 2020) or "v_prediction" (Salimans & Ho 2022, §4)."""
    native_image_size: int = 512
    """unet.sample_size × VAE factor: 512 for SD1.x and SD2-base, 768 for SD2 768-v, 128 for the tiny models."""
    vae_scale_factor: int = 8
    scaling_factor: float = 0.18215
    """z = scaling_factor · E(x) (0.18215 for SD1.x and SD2.x)."""
    attention: AttentionLayout = field(default_factory=AttentionLayout)
    learnable: tuple[str, ...] = ("prompt_embeds",)
    """Keys of the null conditioning that Null-text Inversion optimises (the rest stay at the model's null)."""

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}"
            )

    @property
    def description(self) -> str:
        """'sd2-v (v_prediction, 768 px, text width 1024)'."""
        return (
            f"{self.name} ({self.prediction_type}, {self.native_image_size} px, text width {self.attention.text_width})"
        )

    def encode_prompts(self, model, prompts: list[str]) -> Cond:
        from nti_lightning.text import encode_text

        return {"prompt_embeds": encode_text(model, prompts)}

    def null(self, model, batch_size: int = 1) -> Cond:
        """ψ("") repeated: the initial null ∅_T (Algorithm 1, line 6)."""
        return {k: v.expand(batch_size, *v.shape[1:]).clone() for k, v in self.encode_prompts(model, [""]).items()}

    def unet_kwargs(self, cond: Cond) -> dict:
        return {"encoder_hidden_states": cond["prompt_embeds"]}


SD1 = Family()
"""SD1.x at its defaults (the configs of a real SD1.x model); loaded models carry a ``family_from_configs`` one."""


def _heads(unet_config: dict[str, Any]) -> tuple[int, ...]:
    """Heads per down block: diffusers reads SD's ``attention_head_dim`` as the head *count* (its long-standing
    naming quirk) unless ``num_attention_heads`` is set."""
    heads = unet_config.get("num_attention_heads") or unet_config.get("attention_head_dim") or 8
    blocks = len(unet_config.get("down_block_types", ())) or 4
    return tuple(int(h) for h in heads) if isinstance(heads, (list, tuple)) else (int(heads),) * blocks


def is_sd2_layout(unet_config: dict[str, Any]) -> bool:
    """SD2.x's UNet: linear transformer projections (and a head size per block), or SD2's 1024-d text width."""
    return bool(unet_config.get("use_linear_projection")) or int(unet_config.get("cross_attention_dim", 0)) == 1024


def family_from_configs(
    unet_config: dict[str, Any], vae_config: dict[str, Any], scheduler_config: dict[str, Any], context_length: int
) -> Family:
    """The family of a model from its component configs (``UNet2DConditionModel``, ``AutoencoderKL``, the
    scheduler) and its tokenizer's ``model_max_length``. Raises ``ValueError`` for an unsupported model."""
    if unet_config.get("addition_embed_type") == "text_time":
        raise ValueError(
            "this is an SDXL UNet (addition_embed_type='text_time': pooled text and size conditioning); "
            "SDXL is not supported yet, only SD1.x and SD2.x"
        )
    if int(unet_config.get("in_channels", 4)) != 4:
        raise ValueError(
            f"the UNet takes {unet_config.get('in_channels')} input channels, not 4: an inpainting, depth or "
            "upscaling model; only text-to-image SD1.x / SD2.x models can be inverted"
        )
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    sd2 = is_sd2_layout(unet_config)
    vae_factor = 2 ** (len(vae_config.get("block_out_channels", (0,) * 4)) - 1)
    return Family(
        name=("sd2" if sd2 else "sd1") + ("-v" if prediction_type == "v_prediction" else ""),
        prediction_type=prediction_type,
        native_image_size=int(unet_config.get("sample_size", 64)) * vae_factor,
        vae_scale_factor=vae_factor,
        scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
        attention=AttentionLayout(
            context_length=int(context_length),
            text_width=int(unet_config.get("cross_attention_dim", 768)),
            heads=_heads(unet_config),
            linear_projection=bool(unet_config.get("use_linear_projection")),
        ),
    )
