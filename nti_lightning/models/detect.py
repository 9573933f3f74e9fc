"""What a model folder holds, before any weight is read: its pipeline class, components and scheduler options.

``inspect_folder`` turns a diffusers folder (``save_pretrained`` layout: ``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) into a ``FolderInfo`` or a one-line error saying
what is wrong with it; ``check_scheduler_config`` refuses the scheduler options the DDIM arithmetic here does
not implement, with the reason. ``family_from_configs`` (``family.py``) then names the family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
"""model_index.json classes of an SDXL model (two text encoders, a ``text_time`` UNet)."""
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", *SDXL_PIPELINES)
"""model_index.json classes whose components are a text-to-image SD1.x / SD2.x / SDXL model."""
COMPONENT_CONFIGS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class ModelFolderError(ValueError):
    """A folder that is not a loadable SD1.x / SD2.x / SDXL diffusers model; the message says why."""


class UnsupportedSchedulerError(ValueError):
    """A scheduler option the DDIM sampler and inversion here do not implement; the message says why."""


@dataclass(frozen=True)
class FolderInfo:
    path: Path
    pipeline_class: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    index: dict[str, Any]
    """model_index.json (SDXL: ``force_zeros_for_empty_prompt``)."""


def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFolderError(
            f"{folder} has no {path.relative_to(folder)}; a diffusers folder written by save_pretrained has "
            "model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/ (SDXL also text_encoder_2/ "
            "and tokenizer_2/)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


def inspect_folder(folder: str | Path) -> FolderInfo:
    """Reads and checks a diffusers folder's configs (no weights). Raises ``ModelFolderError``."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json", folder)
    cls = index.get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise ModelFolderError(
            f"{folder}: model_index.json names {cls!r}; expected a Stable Diffusion 1.x / 2.x / XL text-to-image "
            f"pipeline ({', '.join(SUPPORTED_PIPELINES)})"
        )
    sdxl = cls in SDXL_PIPELINES
    configs = {name: _read_json(folder / name / file, folder) for name, file in COMPONENT_CONFIGS.items()}
    text_time = configs["unet"].get("addition_embed_type") == "text_time"
    if sdxl != text_time:
        raise ModelFolderError(
            f"{folder}: model_index.json names {cls} but unet/config.json has addition_embed_type="
            f"{configs['unet'].get('addition_embed_type')!r}; an SDXL pipeline needs a 'text_time' UNet and an "
            "SD1.x / SD2.x pipeline a UNet without one. Fix model_index.json or the UNet config."
        )
    if sdxl:
        configs["text_encoder_2"] = _read_json(folder / "text_encoder_2" / "config.json", folder)
    for tok in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        if not (folder / tok).is_dir():
            raise ModelFolderError(f"{folder} has no {tok}/ folder (vocab.json and merges.txt of a CLIPTokenizer)")
    return FolderInfo(folder, cls, configs["unet"], configs["vae"], configs["scheduler"], index)


def check_scheduler_config(config: dict[str, Any], source: str = "model") -> None:
    """Refuses scheduler options the DDIM steps here (``ddim.py``, diffusers' ``DDIMScheduler.step`` order)
    do not implement. Honoured as given: betas, ``timestep_spacing`` (leading, trailing, linspace),
    ``steps_offset``, ``set_alpha_to_one``, ``prediction_type`` epsilon / v_prediction."""
    pt = config.get("prediction_type", "epsilon")
    if pt not in ("epsilon", "v_prediction"):
        raise UnsupportedSchedulerError(
            f"{source}: prediction_type={pt!r} is not supported; Null-text Inversion here needs a model predicting "
            "ε (SD1.x, SD2-base) or v (SD2 768-v)"
        )
    if config.get("rescale_betas_zero_snr"):
        raise UnsupportedSchedulerError(
            f"{source}: rescale_betas_zero_snr=True is not supported. Zero terminal SNR (Lin et al. 2024) sets "
            "ᾱ of the last training step to 0 (diffusers clamps it to 2⁻²⁴): the DDIM inversion's last step then "
            "drops the image's x̂₀ (z*_T is its ε̂ alone) and the sampler's first step replaces it with the model's "
            "guess from pure noise, so inversion and sampling stop being each other's inverse exactly where "
            "Null-text Inversion's pivot assumes they nearly are (with ε-prediction x̂₀ = (z − √(1−ᾱ) ε)/√ᾱ even "
            "divides by 2⁻¹²). This is not implemented or tested here; use the model's original betas "
            "(rescale_betas_zero_snr=False)."
        )
    if config.get("thresholding"):
        raise UnsupportedSchedulerError(
            f"{source}: thresholding=True (dynamic thresholding, Imagen) is not supported: it clips pixel-space "
            "x̂₀ and is meaningless for latent diffusion; set it to False"
        )
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        raise UnsupportedSchedulerError(
            f"{source}: timestep_spacing={spacing!r} is not supported; expected one of {TIMESTEP_SPACINGS}"
        )
