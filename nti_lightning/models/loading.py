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

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from nti_lightning.models.attention_dispatch import direct_attention_dispatch
from nti_lightning.models.compat import dtype_kwargs
from nti_lightning.models.detect import (
    SDXL_PIPELINES,
    ModelFolderError,
    UnsupportedSchedulerError,
    check_scheduler_config,
    inspect_folder,
)
from nti_lightning.models.embedded import ASSETS_DIR, shared_components
from nti_lightning.models.family import Family, family_from_configs, is_sd2_layout

TINY_DIR = ASSETS_DIR / "tiny"
EMBEDDED = {"tiny": TINY_DIR, "tiny-sd2-v": ASSETS_DIR / "tiny_sd2", "tiny-sdxl": ASSETS_DIR / "tiny_sdxl"}
"""Names of the embedded models → their diffusers folders inside the package."""
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


class ModelNotFoundError(FileNotFoundError):
    """``model.spec`` names no model that can be loaded here (a path that is not there, no hub)."""


def _quiet_libraries() -> None:
    """A quiet console: no per-component progress bars or notices from diffusers / transformers."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def _pipeline_class(pipeline_class: str | None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if pipeline_class in SDXL_PIPELINES else StableDiffusionPipeline


def _pipeline_kwargs(pipeline_class: str | None, kwargs: dict) -> dict:
    """SD1.x / SD2.x: no safety checker; SDXL has none, and no invisible watermark (it would need a package)."""
    if pipeline_class in SDXL_PIPELINES:
        return {**dtype_kwargs(kwargs["torch_dtype"]), "add_watermarker": False}
    return {**{k: v for k, v in kwargs.items() if k != "torch_dtype"}, **dtype_kwargs(kwargs["torch_dtype"])}


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


CHECKPOINT_PARTS = {
    "model.diffusion_model.": "UNet",
    "first_stage_model.": "VAE",
    "cond_stage_model.": "text encoder",
}
"""Key prefixes of an original (LDM / CompVis) SD1.x / SD2.x checkpoint → the component under each."""
CROSS_ATTENTION_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
"""The first cross-attention's key projection: its input width is the text width (768 SD1.x, 1024 SD2.x)."""
OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"
"""Present in SD2.x checkpoints (OpenCLIP text encoder); SD1.x ones hold cond_stage_model.transformer.* (CLIP)."""


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Key → shape of a .safetensors file's tensors, read from its header (no weights); None for a .ckpt."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ModelFolderError(f"checkpoint {path} is not a readable .safetensors file ({e})") from e


def _fix(config_dir) -> str:
    return f"config_dir must be the diffusers folder of the checkpoint's own model (config_dir={config_dir})"


def check_checkpoint_matches(shapes: dict[str, tuple[int, ...]], unet_config: dict, path, config_dir) -> None:
    """Refuses a checkpoint that is not a whole SD1.x / SD2.x model, or whose family is not the config folder's.

    Diffusers would otherwise fill a component missing from the file with the folder's own weights (or leave it
    random), and read weights into configs of another family wherever the shapes happen to fit."""
    fix = _fix(config_dir)
    if any(k.startswith(SDXL_PREFIX) for k in shapes):
        raise ModelFolderError(
            f"checkpoint {path} is an SDXL checkpoint ({SDXL_PREFIX}*) but {config_dir} is an SD1.x / SD2.x "
            f"folder; {fix} (for SDXL a StableDiffusionXLPipeline folder)"
        )
    for prefix, part in CHECKPOINT_PARTS.items():
        if not any(k.startswith(prefix) for k in shapes):
            raise ModelFolderError(
                f"checkpoint {path} has no {part} weights ({prefix}*): not a whole original-layout SD1.x / SD2.x "
                "checkpoint; load a diffusers folder instead, or a checkpoint with UNet, VAE and text encoder"
            )
    width = int(unet_config.get("cross_attention_dim", 768))
    if CROSS_ATTENTION_KEY in shapes and shapes[CROSS_ATTENTION_KEY][-1] != width:
        raise ModelFolderError(
            f"checkpoint {path}: its UNet reads text of width {shapes[CROSS_ATTENTION_KEY][-1]} but {config_dir}'s "
            f"unet/config.json has cross_attention_dim {width}; {fix} (SD2.x: 1024, SD1.x: 768)"
        )
    file_sd2, folder_sd2 = OPEN_CLIP_KEY in shapes, is_sd2_layout(unet_config)
    if file_sd2 != folder_sd2:
        name = {True: "SD2.x (OpenCLIP text encoder, linear projections)", False: "SD1.x (CLIP text encoder)"}
        raise ModelFolderError(
            f"checkpoint {path} is an {name[file_sd2]} checkpoint but {config_dir} is an {name[folder_sd2]} "
            f"folder; {fix}"
        )


SDXL_PREFIX = "conditioner."
"""Where an original SDXL checkpoint keeps its text encoders (SD1.x / SD2.x: ``cond_stage_model.``)."""
SDXL_CLIP, SDXL_OPEN_CLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
"""An SDXL base checkpoint's CLIP ViT-L text encoder (diffusers' CLIPTextModel names under it) and its OpenCLIP
ViT-bigG one (OpenCLIP names: fused ``attn.in_proj_*``, ``text_projection`` stored width × projection)."""
SDXL_CHECKPOINT_PARTS = {
    "model.diffusion_model.": "UNet",
    "first_stage_model.": "VAE",
    SDXL_CLIP: "CLIP text encoder (text_encoder)",
    SDXL_OPEN_CLIP: "OpenCLIP text encoder (text_encoder_2)",
}


def _layer_count(shapes: dict, prefix: str) -> int:
    """How many numbered layers ``<prefix><i>.`` the checkpoint holds."""
    return len({k[len(prefix) :].split(".", 1)[0] for k in shapes if k.startswith(prefix)})


def check_sdxl_checkpoint_matches(shapes: dict[str, tuple[int, ...]], configs: dict[str, dict], path, config_dir):
    """Refuses a checkpoint that is not a whole original-layout SDXL base model, or whose shapes are not those of
    the config folder's ``configs`` ("unet", "text_encoder", "text_encoder_2" configs).

    Checked from the header, before any weight is read: the four parts are there; every cross-attention reads
    text of the UNet's width and the add-embedding takes its input width; each text encoder has the folder's
    width, context length, layer count (and projection, for the second). Diffusers would otherwise leave a
    layer the file lacks randomly initialised, or read a text encoder into the other one's config."""
    fix = _fix(config_dir)
    if not any(k.startswith(SDXL_PREFIX) for k in shapes):
        kind = (
            "an SD1.x / SD2.x checkpoint (cond_stage_model.*)"
            if any(k.startswith("cond_stage_model.") for k in shapes)
            else "not an original-layout SDXL checkpoint (no conditioner.* text encoders)"
        )
        raise ModelFolderError(
            f"checkpoint {path} is {kind} but {config_dir} is an SDXL folder; {fix} (for SD1.x / SD2.x a "
            "StableDiffusionPipeline folder)"
        )
    for prefix, part in SDXL_CHECKPOINT_PARTS.items():
        if not any(k.startswith(prefix) for k in shapes):
            raise ModelFolderError(
                f"checkpoint {path} has no {part} weights ({prefix}*): not a whole original-layout SDXL base "
                "checkpoint (UNet, VAE, CLIP and OpenCLIP text encoders); load a diffusers folder instead"
            )
    unet, te, te2 = configs["unet"], configs["text_encoder"], configs["text_encoder_2"]
    te_layers, te2_layers = f"{SDXL_CLIP}text_model.encoder.layers.", f"{SDXL_OPEN_CLIP}transformer.resblocks."
    expected = {  # what the file has → what the folder's configs say, and where
        "UNet text width (attn2.to_k input)": (
            {v[-1] for k, v in shapes.items() if k.startswith("model.diffusion_model.") and "attn2.to_k." in k},
            {unet.get("cross_attention_dim")}, "unet/config.json cross_attention_dim"),
        "UNet add-embedding input (label_emb.0.0)": (
            {shapes.get("model.diffusion_model.label_emb.0.0.weight", (None,))[-1]},
            {unet.get("projection_class_embeddings_input_dim")},
            "unet/config.json projection_class_embeddings_input_dim"),
        "text_encoder (context length, width)": (
            {shapes.get(f"{SDXL_CLIP}text_model.embeddings.position_embedding.weight")},
            {(te.get("max_position_embeddings"), te.get("hidden_size"))},
            "text_encoder/config.json max_position_embeddings, hidden_size"),
        "text_encoder layers": ({_layer_count(shapes, te_layers)}, {te.get("num_hidden_layers")},
                                "text_encoder/config.json num_hidden_layers"),
        "text_encoder_2 (context length, width)": (
            {shapes.get(f"{SDXL_OPEN_CLIP}positional_embedding")},
            {(te2.get("max_position_embeddings"), te2.get("hidden_size"))},
            "text_encoder_2/config.json max_position_embeddings, hidden_size"),
        "text_encoder_2 layers": ({_layer_count(shapes, te2_layers)}, {te2.get("num_hidden_layers")},
                                  "text_encoder_2/config.json num_hidden_layers"),
        "text_encoder_2 projection (width, projection)": (
            {shapes.get(f"{SDXL_OPEN_CLIP}text_projection")}, {(te2.get("hidden_size"), te2.get("projection_dim"))},
            "text_encoder_2/config.json hidden_size, projection_dim"),
    }  # fmt: skip
    for what, (in_file, in_folder, where) in expected.items():
        if in_file != in_folder:
            show = ", ".join(str(v) for v in sorted(in_file, key=str))
            raise ModelFolderError(
                f"checkpoint {path}: {what} is {show} but {config_dir}'s {where} say {next(iter(in_folder))}; {fix}"
            )


def _checkpoint_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose names start with ``prefix`` (a .safetensors file: only those are read)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    return {k: v for k, v in load_single_file_checkpoint(str(path)).items() if k.startswith(prefix)}


def sdxl_text_encoder_2(path: Path, config_dir: Path, dtype: torch.dtype):
    """An SDXL checkpoint's OpenCLIP text encoder as the config folder's ``text_encoder_2``
    (CLIPTextModelWithProjection), converted by diffusers' ``convert_open_clip_checkpoint``; every weight must
    come from the file.

    ``StableDiffusionXLPipeline.from_single_file`` picks the layout of each text encoder by its width: where
    both encoders are equally wide (the tiny SDXL's are both 32) it reads the CLIP encoder into this one too.
    Converting it here, from its own prefix with the folder's config, reads every SDXL checkpoint the same way."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2", local_files_only=True)
    model = CLIPTextModelWithProjection(config)
    state = convert_open_clip_checkpoint(model, _checkpoint_tensors(path, SDXL_OPEN_CLIP), prefix=SDXL_OPEN_CLIP)
    if not hasattr(model, "text_model"):  # as diffusers does for a transformers version without the wrapper
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelFolderError(
            f"checkpoint {path}: its OpenCLIP text encoder ({SDXL_OPEN_CLIP}*) does not fill {config_dir}'s "
            f"text_encoder_2 (missing {missing[:3]}, unexpected {unexpected[:3]}); {_fix(config_dir)}"
        )
    return model.to(dtype).eval()


def _read_config(config_dir, name: str) -> dict:
    return json.loads((Path(config_dir) / name / "config.json").read_text(encoding="utf-8"))


def _from_single_file(path: Path, config_dir, kwargs: dict):
    """A single-file checkpoint → the pipeline; ``config_dir`` (a diffusers folder: its configs and tokenizer,
    weights not needed) names the architecture and the scheduler, so the family is the folder's."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .safetensors or .ckpt file")
    extra, pipeline_class = {}, None
    if config_dir is not None:
        try:  # the configs the checkpoint's weights are read into
            info = inspect_folder(config_dir)
            check_scheduler_config(info.scheduler, f"model config {config_dir}")
            family_from_configs(info.unet, info.vae, info.scheduler, 77, info.index)
        except ValueError as e:
            kind = type(e) if isinstance(e, (ModelFolderError, UnsupportedSchedulerError)) else ModelFolderError
            raise kind(f"config_dir {config_dir} for checkpoint {path}: {e}") from e
        sdxl = info.pipeline_class in SDXL_PIPELINES
        shapes = checkpoint_shapes(path)
        if shapes is not None and sdxl:
            text = {name: _read_config(config_dir, name) for name in ("text_encoder", "text_encoder_2")}
            check_sdxl_checkpoint_matches(shapes, {"unet": info.unet, **text}, path, config_dir)
        elif shapes is not None:
            check_checkpoint_matches(shapes, info.unet, path, config_dir)
        extra = {"config": str(config_dir), "local_files_only": True}
        if sdxl:
            extra["text_encoder_2"] = sdxl_text_encoder_2(path, Path(config_dir), kwargs["torch_dtype"])
        pipeline_class = info.pipeline_class
    cls = _pipeline_class(pipeline_class)
    try:
        return cls.from_single_file(str(path), **extra, **_pipeline_kwargs(pipeline_class, kwargs))
    except Exception as e:  # diffusers raises many kinds here; say what to do
        raise RuntimeError(
            f"could not load single-file checkpoint {path}: {e}. Offline, pass config_dir= a diffusers folder "
            "with the matching model configs (an SD1.x, SD2.x or SDXL folder: for a 768-v checkpoint one whose "
            "scheduler has prediction_type v_prediction; for an SDXL checkpoint a StableDiffusionXLPipeline "
            "folder)."
        ) from e


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
        pipe = _from_single_file(Path(spec_str), config_path, kwargs)
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


def compute_fingerprint(model: NTIModel) -> str:
    """sha256 over every weight's name and shape and a sample of its values, the tokenizer's size and the betas.

    Sampling (first/last 64 values of each tensor) keeps it fast for SD-sized models while still changing
    with any retraining or other checkpoint. Names and shapes pin the architecture (configs are not hashed:
    save/load round trips add bookkeeping keys). Values are hashed at float16 so one checkpoint loaded as
    float32 or float16 has one fingerprint.
    """
    h = hashlib.sha256()
    names = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if model.text_encoder_2 is not None else ())
    for name in names:
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
