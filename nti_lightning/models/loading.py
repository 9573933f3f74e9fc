"""``load_model``: one entry point for every kind of Stable Diffusion the package inverts with.

The embedded default ("tiny") is itself a diffusers folder shipped inside the package, so it loads through
exactly the same path as a real SD1.x folder. The scheduler is always a DDIM scheduler with the authors'
settings (clip_sample=False, set_alpha_to_one=False, steps_offset=1 — what StableDiffusionPipeline
enforces), with the betas of the model's own scheduler config.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from nti_lightning.models.family import SD1, Family

TINY_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"
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
    family: Family = SD1
    """What differs between Stable Diffusion variants: conditioning, the null, what NTI optimises."""

    def __post_init__(self) -> None:
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False)  # frozen: backward fills no weight gradients
            m.eval()
        if not self.fingerprint:
            self.fingerprint = compute_fingerprint(self)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_image_size(self) -> int:
        """unet.sample_size × VAE factor: 512 for SD1.x, 128 for the tiny model."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @cached_property
    def pipeline(self):
        """A diffusers ``StableDiffusionPipeline`` sharing these components (no safety checker)."""
        from diffusers import StableDiffusionPipeline

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
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device=device, dtype=dtype)
        return self


def ddim_scheduler_from(config) -> object:
    """The authors' DDIM scheduler with the betas of ``config`` (any diffusers scheduler config)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(
        config, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon"
    )


def model_from_components(unet, vae, text_encoder, tokenizer, scheduler, source: str = "components") -> NTIModel:
    if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(
            f"model {source}: prediction_type={scheduler.config.prediction_type!r} is not supported; "
            "Null-text Inversion here needs an ε-prediction model (SD1.x, SD2-base)"
        )
    return NTIModel(unet, vae, text_encoder, tokenizer, ddim_scheduler_from(scheduler.config), source=source)


class ModelNotFoundError(FileNotFoundError):
    """``model.spec`` names no model that can be loaded here (a path that is not there, no hub)."""


def load_model(
    spec: str | os.PathLike = "tiny",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    config_dir: str | os.PathLike | None = None,
) -> NTIModel:
    """Loads a Stable Diffusion model for inversion.

    spec: "tiny" (the embedded default), a local diffusers folder (``save_pretrained`` layout), a single-file
    checkpoint (.safetensors/.ckpt; ``config_dir`` names a diffusers folder with the matching configs, needed
    offline), or a hub id (only where the machine can reach a hub).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):  # a quiet console: no per-component bars or notices
        lib.disable_progress_bar()
        lib.set_verbosity_error()

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    spec_str = str(spec)
    kwargs = dict(safety_checker=None, requires_safety_checker=False, dtype=torch_dtype)
    if spec_str == "tiny":
        path, source = TINY_DIR, "tiny"
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"the embedded tiny model is missing from {path}; reinstall nti_lightning")
        pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)
    elif Path(spec_str).is_dir():
        source = str(Path(spec_str).resolve())
        if not (Path(spec_str) / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{spec_str} is a folder but has no model_index.json; expected a diffusers folder written by "
                "save_pretrained (unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        pipe = StableDiffusionPipeline.from_pretrained(spec_str, local_files_only=True, **kwargs)
    elif Path(spec_str).suffix in (".safetensors", ".ckpt"):
        if not Path(spec_str).is_file():
            raise FileNotFoundError(f"checkpoint {spec_str} does not exist")
        source = str(Path(spec_str).resolve())
        extra = {"config": str(config_dir), "local_files_only": True} if config_dir else {}
        try:
            pipe = StableDiffusionPipeline.from_single_file(spec_str, **extra, **kwargs)
        except Exception as e:  # diffusers raises many kinds here; say what to do
            raise RuntimeError(
                f"could not load single-file checkpoint {spec_str}: {e}. Offline, pass config_dir= a diffusers "
                "folder with the matching model configs (e.g. a local copy of stable-diffusion-v1-5)."
            ) from e
    else:
        source = spec_str
        try:
            pipe = StableDiffusionPipeline.from_pretrained(spec_str, **kwargs)
        except Exception as e:
            raise ModelNotFoundError(
                f"could not load model {spec_str!r}: it is not 'tiny', a local folder or a .safetensors/.ckpt "
                f"file, and loading it as a hub id failed ({type(e).__name__}: {e}). Without a hub, download "
                "the model elsewhere and pass its local folder."
            ) from e
    model = model_from_components(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, source=source)
    if device is not None and torch.device(device) != model.device:  # .to() on the same device only warns
        model.to(device)
    return model


def compute_fingerprint(model: NTIModel) -> str:
    """sha256 over every weight's name and shape and a sample of its values, the tokenizer's size and the betas.

    Sampling (first/last 64 values of each tensor) keeps it fast for SD-sized models while still changing
    with any retraining or other checkpoint. Names and shapes pin the architecture (configs are not hashed:
    save/load round trips add bookkeeping keys). Values are hashed at float16 so one checkpoint loaded as
    float32 or float16 has one fingerprint.
    """
    h = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder"):
        h.update(name.encode())
        for key, tensor in getattr(model, name).state_dict().items():
            flat = tensor.detach().flatten()
            sample = torch.cat([flat[:64], flat[-64:]]).to("cpu", torch.float16)
            h.update(f"{key}{tuple(tensor.shape)}".encode())
            h.update(sample.numpy().tobytes())
    h.update(str(len(model.tokenizer)).encode())
    sched = {k: model.scheduler.config[k] for k in ("beta_start", "beta_end", "beta_schedule")}
    sched["num_train_timesteps"] = model.scheduler.config.num_train_timesteps
    h.update(json.dumps(sched, sort_keys=True).encode())
    return h.hexdigest()[:16]
