"""``load_model``: one entry point for every kind of Stable Diffusion the package inverts with.

The embedded models ("tiny" = SD1-shaped ε-prediction, "tiny-sd2-v" = SD2-shaped v-prediction, "tiny-sdxl")
are themselves diffusers folders shipped inside the package, so they load through exactly the same path as a
real SD1.x / SD2.x / SDXL folder (the weights they share are stored once: ``embedded.py``). The family
(``family.py``) is read off the component configs; the scheduler is
always a DDIM scheduler built from the model's own scheduler config (betas, ``timestep_spacing``,
``steps_offset``, ``set_alpha_to_one``, ``prediction_type`` as the model gives them, after the fix-ups
``StableDiffusionPipeline`` applies when loading: ``steps_offset`` 1, ``clip_sample`` False), and options the
DDIM arithmetic here does not implement are refused (``detect.check_scheduler_config``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nti_lightning.models.detect import ModelFolderError, check_scheduler_config, inspect_folder
from nti_lightning.models.embedded import ASSETS_DIR, shared_components
from nti_lightning.models.family import family_from_configs
from nti_lightning.models.model import DTYPES, NTIModel, _pipeline_class, _pipeline_kwargs, model_from_components
from nti_lightning.models.single_file import from_single_file

TINY_DIR = ASSETS_DIR / "tiny"
EMBEDDED = {"tiny": TINY_DIR, "tiny-sd2-v": ASSETS_DIR / "tiny_sd2", "tiny-sdxl": ASSETS_DIR / "tiny_sdxl"}
"""Names of the embedded models → their diffusers folders inside the package."""


class ModelNotFoundError(FileNotFoundError):
    """``model.spec`` names no model that can be loaded here (a path that is not there, no hub)."""


def _quiet_libraries() -> None:
    """A quiet console: no per-component progress bars or notices from diffusers / transformers."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def _from_folder(folder: Path, kwargs: dict):
    """A checked diffusers folder (``detect.inspect_folder``, scheduler options first) → the pipeline."""
    info = inspect_folder(folder)
    check_scheduler_config(info.scheduler, f"model {folder}")
    try:  # refuses inpainting UNets and mismatched SDXL folders before any weight is read
        family_from_configs(info.unet, info.vae, info.scheduler, 77, info.index)
    except ValueError as e:
        raise ModelFolderError(f"model {folder}: {e}") from e
    cls = _pipeline_class(info.pipeline_class)
    shared = shared_components(folder, kwargs["torch_dtype"])  # embedded folders: the weights stored once
    return cls.from_pretrained(folder, local_files_only=True, **_pipeline_kwargs(info.pipeline_class, kwargs), **shared)


def resolve_config_dir(config_dir) -> tuple[Path | None, str | None]:
    """``config_dir`` → (the folder, what an inversion records): an embedded name ("tiny", "tiny-sd2-v",
    "tiny-sdxl") is its folder inside the package and is recorded by name; a path is recorded absolute."""
    if config_dir is None:
        return None, None
    if str(config_dir) in EMBEDDED:
        return EMBEDDED[str(config_dir)], str(config_dir)
    return Path(config_dir), str(Path(config_dir).resolve())


HUB_FILES = (
    "model_index.json",
    "*/config.json",
    "scheduler/*",
    "tokenizer*/*",
    "*/diffusion_pytorch_model.safetensors",
    "*/model.safetensors",
)
"""What ``load_model`` fetches of a hub repository: the configs, tokenizers and full-precision safetensors
weights of a diffusers layout (not the fp16 / ONNX / single-file variants such repositories also hold)."""


def _hub_snapshot(repo_id: str) -> Path:
    """A hub id → its local diffusers folder (downloaded once into the hub cache), loaded and checked like any
    folder, so the family (SD1.x, SD2.x, SDXL) is detected the same way. Raises ``ModelNotFoundError``."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(HUB_FILES)))
    except Exception as e:  # offline, unknown id, no access: huggingface_hub raises many kinds
        raise ModelNotFoundError(
            f"could not load model {repo_id!r}: it is not one of {sorted(EMBEDDED)}, a local folder or a "
            f".safetensors/.ckpt file, and fetching it as a hub id failed ({type(e).__name__}: {e}). Without "
            "a hub, download the model elsewhere and pass its local folder."
        ) from e


def model_source(spec: str | os.PathLike) -> str:
    """What ``load_model(spec).source`` will be, without loading anything: an embedded name as is, a local
    folder or checkpoint file as its absolute path, anything else (a hub id) as given. A run compares it with its
    folder's settings before spending the load."""
    spec_str = str(spec)
    if spec_str in EMBEDDED:
        return spec_str
    if Path(spec_str).is_dir() or Path(spec_str).suffix in (".safetensors", ".ckpt"):
        return str(Path(spec_str).resolve())
    return spec_str


def load_model(
    spec: str | os.PathLike = "tiny",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    config_dir: str | os.PathLike | None = None,
) -> NTIModel:
    """Loads a Stable Diffusion 1.x / 2.x / XL model for inversion; the family is detected (``model.family``).

    spec: an embedded name ("tiny", "tiny-sd2-v", "tiny-sdxl"), a local diffusers folder (``save_pretrained``
    layout), a single-file checkpoint (.safetensors/.ckpt in the original LDM layout; ``config_dir`` names a
    diffusers folder with the matching configs and tokenizer, or an embedded name; needed offline;
    ``model.config_dir`` remembers it), or a hub id (only where the machine can reach a hub). Unloadable folders
    and unsupported models or scheduler options raise one-line errors saying why.
    """
    _quiet_libraries()
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    spec_str = str(spec)
    used_config_dir = None  # only a single-file checkpoint reads its configs from config_dir
    kwargs = dict(safety_checker=None, requires_safety_checker=False, torch_dtype=torch_dtype)
    if spec_str in EMBEDDED:
        path, source = EMBEDDED[spec_str], spec_str
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"the embedded model {spec_str!r} is missing from {path}; reinstall nti_lightning")
        pipe = _from_folder(path, kwargs)
    elif Path(spec_str).is_dir():
        source = str(Path(spec_str).resolve())
        pipe = _from_folder(Path(spec_str), kwargs)
    elif Path(spec_str).suffix in (".safetensors", ".ckpt"):
        source = str(Path(spec_str).resolve())
        config_path, used_config_dir = resolve_config_dir(config_dir)
        pipe = from_single_file(Path(spec_str), config_path, kwargs)
    else:
        source = spec_str
        pipe = _from_folder(_hub_snapshot(spec_str), kwargs)
    sdxl = dict(
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
    )
    model = model_from_components(
        pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, source=source, **sdxl
    )
    model.config_dir = used_config_dir
    if device is not None and torch.device(device) != model.device:  # .to() on the same device only warns
        model.to(device)
    return model
