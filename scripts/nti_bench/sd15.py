"""Stable Diffusion 1.5-shaped components with random weights, built from configs (no download).

The configs are SD1.5's own (``runwayml/stable-diffusion-v1-5``: unet/, vae/ and text_encoder/config.json)
written out here, so a benchmark on a machine without a model hub runs the real architecture and cost:
UNet2DConditionModel ≈ 860M parameters, AutoencoderKL ≈ 84M, CLIP ViT-L/14 text encoder ≈ 123M. Random
weights make the numbers meaningless as images but exact as arithmetic — the FLOPs, memory and time of an
inversion do not depend on the weights' values.

The tokenizer is the tiny model's (``nti_lightning.models.tiny.build_tokenizer``); the text encoder's
vocabulary is sized to it instead of CLIP's 49,408 tokens (the embedding table is a lookup: no FLOPs).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------------------
# SD1.5 component configurations
# ---------------------------------------------------------------------------------------------------------


SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # diffusers reads SD1.x's value as the number of heads (8 heads of 40…160)
}

SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,  # replaced by the tokenizer's size in ``build_sd15_components``
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}

# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def fallback_tokenizer(vocab_size: int = 2048, max_length: int = 77):
    """A byte-level ``CLIPTokenizer`` with no merges and CLIP's two specials last (ids vocab_size − 2, − 1).

    Only for when the tiny model's trained tokenizer files are absent: prompts tokenise to one token per
    byte, which is all a benchmark needs.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())  # the 256 byte symbols of byte-level BPE
    vocab = symbols + [s + "</w>" for s in symbols]
    if len(vocab) + 2 > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level vocabulary ({len(vocab) + 2})")
    vocab += [f"<|unused{k}|>" for k in range(vocab_size - 2 - len(vocab))]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="nti_bench_tok_"))
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def bench_tokenizer():
    """The tiny model's tokenizer, or ``fallback_tokenizer()`` while its trained files are missing."""
    from nti_lightning.models.tiny import VOCAB_SIZE, build_tokenizer

    try:
        return build_tokenizer()
    except FileNotFoundError:
        return fallback_tokenizer(VOCAB_SIZE)


# ---------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return module if dtype == torch.float32 else module.to(dtype=dtype)


def build_sd15_unet(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """SD1.5's UNet2DConditionModel with seeded random weights, created directly on ``device``
    (``"meta"`` gives shapes only: free, for FLOP counting)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**copy.deepcopy(SD15_UNET_CONFIG))
    return _cast(unet, dtype).eval()


def build_sd15_components(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, Any]:
    """``{"unet", "vae", "text_encoder", "tokenizer", "scheduler"}`` shaped like SD1.5, random weights.

    Built on ``device`` directly (initialising ~1B parameters on a GPU takes a second, on 2 CPU cores ~30 s).
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from nti_lightning.models.tiny import build_scheduler

    tokenizer = bench_tokenizer()
    unet = build_sd15_unet(device, dtype, seed)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**copy.deepcopy(SD15_VAE_CONFIG))
        torch.manual_seed(seed + 2)
        text_config = CLIPTextConfig(
            **{
                **SD15_TEXT_ENCODER_CONFIG,
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            }
        )
        text_encoder = CLIPTextModel(text_config)
    return {
        "unet": unet,
        "vae": _cast(vae, dtype).eval(),
        "text_encoder": _cast(text_encoder, dtype).eval(),
        "tokenizer": tokenizer,
        "scheduler": build_scheduler(),  # SD1.x betas; model_from_components makes it the authors' DDIM
    }


def build_sd15_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """An ``NTIModel`` with SD1.5's architecture and random weights (source ``"sd15-random"``)."""
    from nti_lightning.models import model_from_components

    return model_from_components(**build_sd15_components(device, dtype, seed), source="sd15-random")
