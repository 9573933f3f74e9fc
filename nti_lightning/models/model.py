"""``NTIModel``: the frozen components of one Stable Diffusion model, its family and its fingerprint.

``model_from_components`` builds one from loaded diffusers/transformers components (the family is read off
their configs); ``loading.load_model`` is the entry point for names, folders, single files and hub ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property

import torch

from nti_lightning.models.attention_dispatch import direct_attention_dispatch
from nti_lightning.models.compat import dtype_kwargs
from nti_lightning.models.detect import SDXL_PIPELINES, ModelFolderError, check_scheduler_config
from nti_lightning.models.family import Family, family_from_configs

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class NTIModel:
    """Frozen diffusers/transformers components of a Stable Diffusion model."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # diffusers.DDIMScheduler
    source: str = "unknown"
    """Where the weights came from ("tiny", a folder, a file, a hub id)."""
    fingerprint: str = field(default="")
    """Hash of the component configs and a sample of the weights; inversions record it."""
    family: Family | None = None
    """What differs between Stable Diffusion variants (conditioning, the null, the prediction type, sizes);
    read off the component configs when not given."""
    text_encoder_2: torch.nn.Module | None = None
    """SDXL's second text encoder (CLIPTextModelWithProjection); None for SD1.x / SD2.x."""
    tokenizer_2: object | None = None
    config_dir: str | None = None
    """For a single-file checkpoint: the diffusers folder its configs were read from (inversions record it, so
    ``nti edit`` reloads the same model); None otherwise."""

    def __post_init__(self) -> None:
        for m in self.modules:
            m.requires_grad_(False)  # frozen: backward fills no weight gradients
            m.eval()
        direct_attention_dispatch(self.unet)  # same numbers, without diffusers' per-call signature inspection
        if self.family is None:
            self.family = family_from_configs(
                dict(self.unet.config), dict(self.vae.config), dict(self.scheduler.config), self.context_length
            )
        if not self.fingerprint:
            self.fingerprint = compute_fingerprint(self)

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The networks: unet, vae, text_encoder (and text_encoder_2 for SDXL)."""
        extra = [self.text_encoder_2] if self.text_encoder_2 is not None else []
        return [self.unet, self.vae, self.text_encoder, *extra]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def vae_scale_factor(self) -> int:
        return self.family.vae_scale_factor

    @property
    def native_image_size(self) -> int:
        """unet.sample_size × VAE factor: 512 for SD1.x, 768 for SD2 768-v, 128 for the tiny models."""
        return self.family.native_image_size

    @property
    def scaling_factor(self) -> float:
        return self.family.scaling_factor

    @property
    def prediction_type(self) -> str:
        return self.family.prediction_type

    @cached_property
    def pipeline(self):
        """A diffusers ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL) sharing these
        components (no safety checker, no watermark)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.text_encoder_2 is not None:
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=self.scheduler,
                force_zeros_for_empty_prompt=bool(getattr(self.family, "force_zeros_for_empty_prompt", True)),
                add_watermarker=False,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> NTIModel:
        for m in self.modules:
            m.to(device=device, dtype=dtype)
        return self


def ddim_scheduler_from(config, source: str = "model") -> object:
    """A DDIM scheduler with the options of ``config`` (any diffusers scheduler config), checked first.

    ``clip_sample`` is off, as ``StableDiffusionPipeline`` enforces; everything else is the model's."""
    from diffusers import DDIMScheduler

    check_scheduler_config(dict(config), source)
    return DDIMScheduler.from_config(config, clip_sample=False)


def model_from_components(
    unet,
    vae,
    text_encoder,
    tokenizer,
    scheduler,
    source: str = "components",
    text_encoder_2=None,
    tokenizer_2=None,
    force_zeros_for_empty_prompt: bool = True,
) -> NTIModel:
    """An ``NTIModel`` of loaded components; the family is read off their configs (``ValueError`` if none fits).

    SDXL (a ``text_time`` UNet) needs ``text_encoder_2`` and ``tokenizer_2``; ``force_zeros_for_empty_prompt``
    is its pipeline's option (diffusers' default true: the null is zeros rather than ψ(""))."""
    sched = ddim_scheduler_from(scheduler.config, source=f"model {source}")
    pipeline_config = {"force_zeros_for_empty_prompt": force_zeros_for_empty_prompt}
    try:
        family = family_from_configs(
            dict(unet.config), dict(vae.config), dict(sched.config), int(tokenizer.model_max_length), pipeline_config
        )
    except ValueError as e:
        raise ModelFolderError(f"model {source}: {e}") from e
    sdxl = family.num_text_encoders == 2
    if sdxl and (text_encoder_2 is None or tokenizer_2 is None):
        raise ModelFolderError(
            f"model {source}: an SDXL UNet (addition_embed_type='text_time') needs text_encoder_2 and tokenizer_2 "
            "(a StableDiffusionXLPipeline's components)"
        )
    if not sdxl and text_encoder_2 is not None:
        raise ModelFolderError(f"model {source}: text_encoder_2 given, but the UNet is not an SDXL (text_time) UNet")
    return NTIModel(
        unet, vae, text_encoder, tokenizer, sched, source=source, family=family,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )  # fmt: skip


def _pipeline_class(pipeline_class: str | None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if pipeline_class in SDXL_PIPELINES else StableDiffusionPipeline


def _pipeline_kwargs(pipeline_class: str | None, kwargs: dict) -> dict:
    """SD1.x / SD2.x: no safety checker; SDXL has none, and no invisible watermark (it would need a package)."""
    if pipeline_class in SDXL_PIPELINES:
        return {**dtype_kwargs(kwargs["torch_dtype"]), "add_watermarker": False}
    return {**{k: v for k, v in kwargs.items() if k != "torch_dtype"}, **dtype_kwargs(kwargs["torch_dtype"])}


def compute_fingerprint(model: NTIModel) -> str:
    """sha256 over every weight's name and shape and a sample of its values, the tokenizer's size and the betas.

    Sampling (first/last 64 values of each tensor) keeps it fast for SD-sized models while still changing
    with any retraining or other checkpoint. Names and shapes pin the architecture (configs are not hashed:
    save/load round trips add bookkeeping keys). Values are hashed at float16 so one checkpoint loaded as
    float32 or float16 has one fingerprint, and weight names are taken without transformers 4's ``text_model.``
    prefix, so one model has one fingerprint under every supported transformers release.
    """
    h = hashlib.sha256()
    names = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if model.text_encoder_2 is not None else ())
    for name in names:
        h.update(name.encode())
        for key, tensor in getattr(model, name).state_dict().items():
            flat = tensor.detach().flatten()
            sample = torch.cat([flat[:64], flat[-64:]]).to("cpu", torch.float16)
            key = key.removeprefix("text_model.")  # transformers 4 names CLIP text weights text_model.*, 5 does not
            h.update(f"{key}{tuple(tensor.shape)}".encode())
            h.update(sample.numpy().tobytes())
    h.update(str(len(model.tokenizer)).encode())
    sched = {k: model.scheduler.config[k] for k in ("beta_start", "beta_end", "beta_schedule")}
    sched["num_train_timesteps"] = model.scheduler.config.num_train_timesteps
    h.update(json.dumps(sched, sort_keys=True).encode())
    return h.hexdigest()[:16]
