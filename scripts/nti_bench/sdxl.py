"""Stable Diffusion XL's UNet configuration (``stabilityai/stable-diffusion-xl-base-1.0``: unet/config.json),
written out so that its cost can be counted without a download (``scripts/flops_sdxl.py``), and SDXL base's
other components, so a GPU benchmark runs the real architecture with random weights (``build_sdxl_model``).

2.57 B parameters; three levels (320, 640, 1280 channels) with no attention in the first, 2 and 10 transformer
layers per block in the second and third (Podell et al. 2023, §2.1); cross-attention width 2048 (CLIP ViT-L's
768 + OpenCLIP bigG's 1280 concatenated); the pooled 1280-d embedding and 6 time ids (256 each) enter through
``addition_embed_type="text_time"`` (1280 + 6 · 256 = 2816); 128 × 128 latents (1024 px).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

SDXL_IMAGE_SIZE = 1024  # unet sample_size 128 × VAE factor 8

SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),  # read as head counts (64 channels a head)
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

SDXL_VAE_CONFIG: dict[str, Any] = {"scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024}
"""SDXL's VAE differs from SD1.5's in its scaling factor and its fp16 overflow (``force_upcast``) only."""
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "hidden_size": 1280,  # OpenCLIP ViT-bigG/14 (laion2b), diffusers' CLIPTextModelWithProjection
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 1280,
}


def build_sdxl_components(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """SDXL base's shapes with seeded random weights, built on ``device`` (``"meta"``: shapes only): the keyword
    arguments of ``models.model_from_components`` (UNet 2.57 B, CLIP ViT-L, OpenCLIP bigG with projection, the
    VAE 84 M). Both text encoders use the benchmark tokenizer (``sd15.bench_tokenizer``), their embedding tables
    sized to it (a lookup: no FLOPs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from nti_bench.sd15 import SD15_TEXT_ENCODER_CONFIG, SD15_VAE_CONFIG, _cast, bench_tokenizer
    from nti_lightning.models.tiny import build_scheduler

    tokenizer = bench_tokenizer()
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**copy.deepcopy(SDXL_UNET_CONFIG))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**{**copy.deepcopy(SD15_VAE_CONFIG), **SDXL_VAE_CONFIG})
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**SD15_TEXT_ENCODER_CONFIG, **ids}))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**SDXL_TEXT_ENCODER_2_CONFIG, **ids}))
    return {
        "unet": _cast(unet, dtype).eval(),
        "vae": _cast(vae, dtype).eval(),
        "text_encoder": _cast(text_encoder, dtype).eval(),
        "text_encoder_2": _cast(text_encoder_2, dtype).eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": build_scheduler(),  # SD's scaled-linear betas, as SDXL base
        "force_zeros_for_empty_prompt": True,  # SDXL base's model_index.json
    }


def build_sdxl_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """An ``NTIModel`` with SDXL base's architecture and random weights (source ``"sdxl-random"``)."""
    from nti_lightning.models import model_from_components

    return model_from_components(**build_sdxl_components(device, dtype, seed), source="sdxl-random")
