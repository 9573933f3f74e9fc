"""Writes a diffusers model (UNet, VAE, text encoder(s)) as ONE original-LDM / CompVis-layout .safetensors file.

The key layout is the one diffusers' ``from_single_file`` reads (``diffusers/loaders/single_file_utils.py``:
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``), written here in the other direction:

- UNet → ``model.diffusion_model.*`` (``input_blocks`` / ``middle_block`` / ``output_blocks``, resnets as
  ``in_layers`` / ``out_layers`` / ``emb_layers`` / ``skip_connection``; transformer blocks keep their names);
- VAE → ``first_stage_model.*`` (``down.i.block.j``, ``mid.block_1``, ``mid.attn_1`` with 1×1-conv q/k/v,
  the decoder's ``up`` blocks numbered in reverse);
- SD1 CLIP text encoder → ``cond_stage_model.transformer.text_model.*`` (diffusers' own names);
- SD2 OpenCLIP text encoder → ``cond_stage_model.model.*`` (``transformer.resblocks.i`` with fused
  ``attn.in_proj_weight``, ``ln_1``/``ln_2``, ``mlp.c_fc``/``mlp.c_proj``, ``token_embedding``,
  ``positional_embedding``, ``ln_final``).

- SDXL: the UNet's ``add_embedding.linear_1/2`` → ``label_emb.0.0`` / ``label_emb.0.2``; the CLIP text encoder
  → ``conditioner.embedders.0.transformer.text_model.*``, the OpenCLIP one (CLIPTextModelWithProjection) →
  ``conditioner.embedders.1.model.*`` in the SD2 layout plus ``text_projection`` (the projection transposed).

Which text-encoder layout to write follows the model: two encoders → SDXL, else the UNet
(``family.is_sd2_layout``), as in the original checkpoints.
Diffusers detects the text encoder by ``cond_stage_model.transformer.text_model.embeddings.position_embedding
.weight`` (CLIP) or ``cond_stage_model.model.token_embedding.weight`` (OpenCLIP); SD1 vs SD2, ε vs v are read
from the ``config=`` folder when one is given (as ``load_model(..., config_dir=)`` always does offline).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from nti_lightning.models.family import is_sd2_layout

UNET, VAE, CLIP, OPEN_CLIP = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.transformer.",
    "cond_stage_model.model.",
)
SDXL_CLIP, SDXL_OPEN_CLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_prefixes(n_blocks: int, layers: int, up_has_attention: list[bool]) -> dict[str, tuple[str, dict]]:
    """diffusers module prefix → (LDM prefix, renames of the part after it) for an SD / SDXL UNet.

    Every block gets resnet and attention prefixes; a block without attention (SDXL's first down block, the last
    up block) has no keys under its attention prefix. A transformer's depth (``transformer_blocks.k``) is in the
    part after the prefix, which keeps its name."""
    m = {"time_embedding.linear_1": ("time_embed.0", {}), "time_embedding.linear_2": ("time_embed.2", {}),
         "conv_in": ("input_blocks.0.0", {}), "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {}),
         "mid_block.resnets.0": ("middle_block.0", UNET_RESNET), "mid_block.attentions.0": ("middle_block.1", {}),
         "mid_block.resnets.1": ("middle_block.2", UNET_RESNET),
         "add_embedding.linear_1": ("label_emb.0.0", {}), "add_embedding.linear_2": ("label_emb.0.2", {})}  # fmt: skip
    i = 1
    for b in range(n_blocks):
        for j in range(layers):
            m[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{i}.0", UNET_RESNET)
            m[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{i}.1", {})
            i += 1
        if b < n_blocks - 1:
            m[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{i}.0.op", {})
            i += 1
    for b in range(n_blocks):
        for j in range(layers + 1):
            i = b * (layers + 1) + j
            m[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{i}.0", UNET_RESNET)
            m[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{i}.1", {})
        if b < n_blocks - 1:  # after the block's last layer: output_blocks.i.1 (no attention) or .2
            m[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{i}.{2 if up_has_attention[b] else 1}.conv", {})
    return m


def vae_prefixes(n_blocks: int, layers: int) -> dict[str, tuple[str, dict]]:
    """diffusers module prefix → (LDM prefix, renames) for an ``AutoencoderKL``."""
    m = {"encoder.conv_norm_out": ("encoder.norm_out", {}), "decoder.conv_norm_out": ("decoder.norm_out", {})}
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", VAE_RESNET)
        m[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", VAE_RESNET)
        m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION)
    for b in range(n_blocks):
        for j in range(layers + 1):  # the decoder has one more resnet per block
            m[f"encoder.down_blocks.{b}.resnets.{j}"] = (f"encoder.down.{b}.block.{j}", VAE_RESNET)
            m[f"decoder.up_blocks.{b}.resnets.{j}"] = (f"decoder.up.{n_blocks - 1 - b}.block.{j}", VAE_RESNET)
        m[f"encoder.down_blocks.{b}.downsamplers.0.conv"] = (f"encoder.down.{b}.downsample.conv", {})
        m[f"decoder.up_blocks.{b}.upsamplers.0.conv"] = (f"decoder.up.{n_blocks - 1 - b}.upsample.conv", {})
    return m


def rename(key: str, prefixes: dict[str, tuple[str, dict]]) -> str:
    """One diffusers key in LDM names: its longest mapped module prefix replaced, then the part after it renamed;
    keys under no mapped module keep their name (conv_in, quant_conv, the transformer blocks' inner names)."""
    best = max((p for p in prefixes if key.startswith(p + ".")), key=len, default=None)
    if best is None:
        return key
    new_prefix, renames = prefixes[best]
    rest = key[len(best) + 1 :]
    for old, new in renames.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old) :]
            break
    return f"{new_prefix}.{rest}"


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    cfg = unet.config
    up_attention = ["CrossAttn" in t for t in cfg.up_block_types]
    prefixes = unet_prefixes(len(cfg.down_block_types), int(cfg.layers_per_block), up_attention)
    return {UNET + rename(k, prefixes): v for k, v in unet.state_dict().items()}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    cfg = vae.config
    prefixes = vae_prefixes(len(cfg.down_block_types), int(cfg.layers_per_block))
    out = {}
    for k, v in vae.state_dict().items():
        new = rename(k, prefixes)
        is_attention_linear = ".mid.attn_1." in new and new.endswith(".weight") and v.ndim == 2
        out[VAE + new] = v[:, :, None, None] if is_attention_linear else v  # LDM's q/k/v/proj_out are 1×1 convs
    return out


def clip_to_ldm(text_encoder, prefix: str = CLIP) -> dict[str, torch.Tensor]:
    """SD1: diffusers' CLIPTextModel names under ``cond_stage_model.transformer.text_model.``."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


OPEN_CLIP_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip


def open_clip_to_ldm(text_encoder, prefix: str = OPEN_CLIP) -> dict[str, torch.Tensor]:
    """SD2: OpenCLIP names under ``cond_stage_model.model.``; q, k, v fused into ``attn.in_proj_*``. A
    CLIPTextModelWithProjection's projection is written as OpenCLIP's ``text_projection`` (width × projection:
    the transpose of the Linear weight, as ``convert_open_clip_checkpoint`` reads it); a CLIPTextModel gets an
    identity one (diffusers before 0.33 read the q/k/v split width off it, else off ``projection_dim``)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {prefix + new: sd[old] for old, new in OPEN_CLIP_NAMES.items()}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T
    else:  # every OpenCLIP checkpoint has one (SD2's 1024 × 1024, unused by its CLIPTextModel): width × width here
        out[prefix + "text_projection"] = torch.eye(text_encoder.config.hidden_size)
    for i in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            for old, new in OPEN_CLIP_LAYER.items():
                out[f"{dst}{new}.{kind}"] = sd[f"{src}{old}.{kind}"]
    return out


def to_ldm_state_dict(model) -> dict[str, torch.Tensor]:
    """An ``NTIModel``'s (or pipeline's) UNet, VAE and text encoder(s) in one original-layout state dict."""
    if getattr(model, "text_encoder_2", None) is not None:  # SDXL
        text = {**clip_to_ldm(model.text_encoder, SDXL_CLIP), **open_clip_to_ldm(model.text_encoder_2, SDXL_OPEN_CLIP)}
    elif is_sd2_layout(dict(model.unet.config)):
        text = open_clip_to_ldm(model.text_encoder)
    else:
        text = clip_to_ldm(model.text_encoder)
    sd = {**unet_to_ldm(model.unet), **vae_to_ldm(model.vae), **text}
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def write_single_file(model, path: str | Path) -> Path:
    """``to_ldm_state_dict(model)`` saved as one .safetensors file."""
    path = Path(path)
    save_file(to_ldm_state_dict(model), str(path))
    return path


def copy_configs(folder: str | Path, dest: str | Path) -> Path:
    """``folder`` (a diffusers folder) without its weight files: the configs and tokenizer a single-file
    checkpoint needs, so whatever loads from it can only have read its weights from the checkpoint."""
    import shutil

    weights = ("*.safetensors", "*.bin", "*.ckpt", "*.pt")
    return Path(shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(*weights)))
