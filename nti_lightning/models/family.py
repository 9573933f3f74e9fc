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

- SDXL (``SDXLFamily``, ``sdxl``): two text encoders (CLIP ViT-L and OpenCLIP bigG with a projection); ψ(P) is
  the penultimate hidden states of both concatenated, (B, 77, 768 + 1280), plus the second encoder's pooled,
  projected embedding ``text_embeds`` (B, 1280) and the size conditioning ``time_ids`` (B, 6) = (original
  h, w, crop top, left, target h, w) (Podell et al. 2023, §2.2), handed to the UNet as
  ``added_cond_kwargs``; the null is zeros where the pipeline's ``force_zeros_for_empty_prompt`` is set,
  else ψ(""), as StableDiffusionXLPipeline.encode_prompt.
"""

from __future__ import annotations

import dataclasses
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
    """Keys of the null conditioning that Null-text Inversion optimises by default (the rest stay at the
    model's null); ``InversionConfig.optimize`` chooses others among ``cond_keys``."""
    vae_force_upcast: bool = False
    """Run the VAE in fp32 whatever the model's dtype (SDXL's VAE overflows in fp16: its config's
    ``force_upcast``). A non-finite fp16/bf16 result is retried in fp32 for every family
    (``sampling.encode_latents`` / ``decode_latents``)."""

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

    @property
    def cond_keys(self) -> tuple[str, ...]:
        """The keys of this family's ``Cond``: what ``encode_prompts`` gives and the UNet takes."""
        return ("prompt_embeds",)

    @property
    def num_text_encoders(self) -> int:
        """Text encoders (and tokenizers) ``encode_prompts`` reads: 1, SDXL 2 (``text_encoder_2``)."""
        return 1

    def at_size(self, image_size: int | None) -> Family:
        """The family conditioning images of ``image_size`` px (None: the native size). SD1.x / SD2.x do not
        depend on it; SDXL's time ids do."""
        return self

    def learnable_keys(self, optimize: list[str] | tuple[str, ...] | None = None) -> tuple[str, ...]:
        """The null's keys NTI optimises: ``optimize`` (``InversionConfig.optimize``) checked against
        ``cond_keys``, or the family's default ``learnable``."""
        if optimize is None:
            return self.learnable
        keys = tuple(optimize)
        unknown = [k for k in keys if k not in self.cond_keys]
        if unknown or not keys or len(set(keys)) != len(keys):
            hint = " (SDXL's pooled embedding is text_embeds)" if "pooled" in unknown else ""
            raise ValueError(
                f"inversion.optimize={list(keys)}: the {self.name} null has the keys {list(self.cond_keys)}; "
                f"give a non-empty list of distinct ones{hint}"
            )
        return keys

    def unet_kwargs(self, cond: Cond) -> dict:
        return {"encoder_hidden_states": cond["prompt_embeds"]}


def size_time_ids(original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, §2.2): (original h, w, crop top, left, target h, w) → (6,),
    as StableDiffusionXLPipeline._get_add_time_ids."""
    return torch.tensor([*original, *crop_top_left, *target], dtype=torch.float32)


@dataclass(frozen=True)
class SDXLFamily(Family):
    """SDXL (Podell et al. 2023): ψ(P) of two text encoders, the pooled embedding and size conditioning.

    ``encode_prompts`` → {"prompt_embeds": (B, 77, D₁ + D₂) the penultimate hidden states of both encoders
    concatenated, "text_embeds": (B, D₂) the second encoder's pooled projection, "time_ids": (B, 6)}. The
    time ids are (s, s, 0, 0, s, s): original size = target size = the image side s (the native size unless
    ``at_size``), crop top-left (0, 0), StableDiffusionXLPipeline's defaults at height = width = s; the null
    uses the same ones (its ``negative_add_time_ids`` default). NTI optimises the unconditional branch's
    prompt_embeds and text_embeds per timestep; time_ids on request (``InversionConfig.optimize``)."""

    name: str = "sdxl"
    native_image_size: int = 1024
    scaling_factor: float = 0.13025
    learnable: tuple[str, ...] = ("prompt_embeds", "text_embeds")
    vae_force_upcast: bool = True
    force_zeros_for_empty_prompt: bool = True
    """The pipeline's config (model_index.json): the null is all zeros instead of ψ("") (SDXL base: true)."""
    pooled_width: int = 1280
    """Width of ``text_embeds``: the second text encoder's ``projection_dim``."""
    image_size: int | None = None
    """The image side the time ids describe (``at_size``); None: the native size."""

    @property
    def description(self) -> str:
        null = "zero null" if self.force_zeros_for_empty_prompt else 'null ψ("")'
        return f"{super().description}, pooled {self.pooled_width}, {null}"

    @property
    def cond_keys(self) -> tuple[str, ...]:
        return ("prompt_embeds", "text_embeds", "time_ids")

    @property
    def num_text_encoders(self) -> int:
        return 2

    def at_size(self, image_size: int | None) -> SDXLFamily:
        native = image_size in (None, self.native_image_size)
        return dataclasses.replace(self, image_size=None if native else int(image_size))

    def time_ids(self, batch_size: int) -> Tensor:
        """(B, 6): original = target = the image size (native unless ``at_size``), crop (0, 0)."""
        s = self.image_size or self.native_image_size
        return size_time_ids((s, s), (0, 0), (s, s)).expand(batch_size, 6).clone()

    def encode_prompts(self, model, prompts: list[str]) -> Cond:
        from nti_lightning.text import encode_text_sdxl

        hidden, pooled = encode_text_sdxl(model, prompts)  # (B, 77, D₁ + D₂), (B, D₂)
        return {"prompt_embeds": hidden, "text_embeds": pooled, "time_ids": self.time_ids(len(prompts)).to(hidden)}

    def null(self, model, batch_size: int = 1) -> Cond:
        """∅_T: zeros (``force_zeros_for_empty_prompt``) or ψ(""), with the prompts' time ids."""
        null = self.encode_prompts(model, [""])
        if self.force_zeros_for_empty_prompt:
            null = {**null, "prompt_embeds": torch.zeros_like(null["prompt_embeds"])}
            null["text_embeds"] = torch.zeros_like(null["text_embeds"])
        return {k: v.expand(batch_size, *v.shape[1:]).clone() for k, v in null.items()}

    def unet_kwargs(self, cond: Cond) -> dict:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return {"encoder_hidden_states": cond["prompt_embeds"], "added_cond_kwargs": added}


def _heads(unet_config: dict[str, Any]) -> tuple[int, ...]:
    """Heads per down block: diffusers reads SD's ``attention_head_dim`` as the head *count* (its long-standing
    naming quirk) unless ``num_attention_heads`` is set."""
    heads = unet_config.get("num_attention_heads") or unet_config.get("attention_head_dim") or 8
    blocks = len(unet_config.get("down_block_types", ())) or 4
    return tuple(int(h) for h in heads) if isinstance(heads, (list, tuple)) else (int(heads),) * blocks


def is_sd2_layout(unet_config: dict[str, Any]) -> bool:
    """SD2.x's UNet: linear transformer projections (and a head size per block), or SD2's 1024-d text width."""
    return bool(unet_config.get("use_linear_projection")) or int(unet_config.get("cross_attention_dim", 0)) == 1024


def is_sdxl_unet(unet_config: dict[str, Any]) -> bool:
    """SDXL's UNet: ``addition_embed_type="text_time"`` (pooled text and size conditioning)."""
    return unet_config.get("addition_embed_type") == "text_time"


def pooled_width(unet_config: dict[str, Any]) -> int:
    """SDXL: the pooled embedding's width = the added embedding's input minus 6 time ids' embeddings."""
    total = int(unet_config.get("projection_class_embeddings_input_dim") or 0)
    return total - 6 * int(unet_config.get("addition_time_embed_dim") or 0)


def family_from_configs(
    unet_config: dict[str, Any],
    vae_config: dict[str, Any],
    scheduler_config: dict[str, Any],
    context_length: int,
    pipeline_config: dict[str, Any] | None = None,
) -> Family:
    """The family of a model from its component configs (``UNet2DConditionModel``, ``AutoencoderKL``, the
    scheduler), its tokenizer's ``model_max_length`` and, for SDXL, the pipeline's config (model_index.json:
    ``force_zeros_for_empty_prompt``, default true as diffusers'). Raises ``ValueError`` for an unsupported
    model."""
    sdxl = is_sdxl_unet(unet_config)
    if unet_config.get("addition_embed_type") not in (None, "text_time"):
        raise ValueError(
            f"the UNet's addition_embed_type={unet_config.get('addition_embed_type')!r} is not supported; only "
            "SD1.x / SD2.x (none) and SDXL ('text_time')"
        )
    if sdxl and pooled_width(unet_config) <= 0:
        raise ValueError(
            "an SDXL UNet (addition_embed_type='text_time') needs projection_class_embeddings_input_dim > "
            "6 · addition_time_embed_dim in unet/config.json"
        )
    if int(unet_config.get("in_channels", 4)) != 4:
        raise ValueError(
            f"the UNet takes {unet_config.get('in_channels')} input channels, not 4: an inpainting, depth or "
            "upscaling model; only text-to-image SD1.x / SD2.x models can be inverted"
        )
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    vae_factor = 2 ** (len(vae_config.get("block_out_channels", (0,) * 4)) - 1)
    common = dict(
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
    v = "-v" if prediction_type == "v_prediction" else ""
    if sdxl:
        return SDXLFamily(
            name="sdxl" + v,
            vae_force_upcast=bool(vae_config.get("force_upcast", True)),
            force_zeros_for_empty_prompt=bool((pipeline_config or {}).get("force_zeros_for_empty_prompt", True)),
            pooled_width=pooled_width(unet_config),
            **common,
        )
    return Family(name=("sd2" if is_sd2_layout(unet_config) else "sd1") + v, **common)
