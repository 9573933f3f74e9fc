"""Single-file checkpoints (original LDM / CompVis layout): header checks against the config folder, SDXL's
second text encoder, and the pipeline read from the file.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from nti_lightning.models.detect import (
    SDXL_PIPELINES,
    ModelFolderError,
    UnsupportedSchedulerError,
    check_scheduler_config,
    inspect_folder,
)
from nti_lightning.models.family import family_from_configs, is_sd2_layout
from nti_lightning.models.model import _pipeline_class, _pipeline_kwargs

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


def unpickling_refusal(error: BaseException) -> str | None:
    """torch.load(weights_only=True)'s refusal in ``error``'s chain (diffusers wraps it in an OSError about
    "unable to load weights"): the first line of the innermost one, e.g. "Trying to load unsupported GLOBAL
    posix.system whose module posix is blocked"; None if the chain holds none."""
    seen: set[int] = set()
    found = None
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, pickle.UnpicklingError):
            found = str(error).strip().splitlines()[0].rstrip(".")
        error = error.__cause__ or error.__context__
    return found


def from_single_file(path: Path, config_dir, kwargs: dict):
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
        if (refusal := unpickling_refusal(e)) is not None:
            raise ModelFolderError(
                f"checkpoint {path} was refused as unsafe to unpickle: it holds more than weights ({refusal}), and "
                "loading it could run code. Use a .safetensors file of the model, or convert this one where you "
                "trust it."
            ) from e
        raise RuntimeError(
            f"could not load single-file checkpoint {path}: {e}. Offline, pass config_dir= a diffusers folder "
            "with the matching model configs (an SD1.x, SD2.x or SDXL folder: for a 768-v checkpoint one whose "
            "scheduler has prediction_type v_prediction; for an SDXL checkpoint a StableDiffusionXLPipeline "
            "folder)."
        ) from e
