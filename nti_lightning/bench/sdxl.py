"""Stable Diffusion XL's UNet configuration (``stabilityai/stable-diffusion-xl-base-1.0``: unet/config.json),
written out so that its cost can be counted without a download (``scripts/flops_sdxl.py``).

2.57 B parameters; three levels (320, 640, 1280 channels) with no attention in the first, 2 and 10 transformer
layers per block in the second and third (Podell et al. 2023, §2.1); cross-attention width 2048 (CLIP ViT-L's
768 + OpenCLIP bigG's 1280 concatenated); the pooled 1280-d embedding and 6 time ids (256 each) enter through
``addition_embed_type="text_time"`` (1280 + 6 · 256 = 2816); 128 × 128 latents (1024 px).
"""

from __future__ import annotations

from typing import Any

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
