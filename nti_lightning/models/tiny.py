"""The embedded default model: a tiny Stable-Diffusion-shaped pipeline shipped with the package.

Every component has SD1.x's layout at a fraction of its width, so the code paths that run on Stable
Diffusion v1.4 (Mokady et al. 2023 use it for Null-text Inversion) run unchanged here, offline, in seconds:

- UNet2DConditionModel: 3 CrossAttnDownBlock2D + 1 DownBlock2D, mirrored up blocks, a cross-attention mid
  block, one layer per block (10 transformer blocks = 20 attention modules), widths (32, 32, 64, 64),
  2 heads (16–32 channels a head), 16×16 latents;
- AutoencoderKL: 4 levels (downsampling ×8), 4 latent channels, so the native image size is 128 px;
- CLIPTextModel: hidden size 32, 2 layers, 77 positions, over a small byte-level BPE vocabulary with CLIP's
  special tokens and pre-tokenisation (``CLIPTokenizer``);
- DDIMScheduler with SD1.x's betas and ``steps_offset=1`` (timesteps 981, 961, …, 1 for T = 50).

``assets/tiny/`` holds these components with weights trained by ``scripts/train_tiny.py`` (see the README
there); ``build_random_components`` gives the same architecture with seeded random weights for fast tests.

The same script trains two more tiny families on the same VAE and vocabulary (``--family sd2|sdxl``), whose
layouts are here too: ``SD2_UNET_CONFIG`` / ``SD2_TEXT_ENCODER_CONFIG`` / ``SD2_SCHEDULER_CONFIG`` (SD2.x:
linear-projection transformers, ``attention_head_dim`` per block, a wider GELU text encoder (48 = SD2's 1024
scaled down as SD1's 768 → 32), a tokenizer padding with "!" as OpenCLIP's, v-prediction) and
``SDXL_UNET_CONFIG`` (SDXL: two text encoders, the second with a projection, ``addition_embed_type="text_time"``
conditioning on pooled text and ``add_time_ids``); ``build_random_family_components`` builds them. They are
written to ``assets/tiny_sd2`` / ``assets/tiny_sdxl`` when trained (``TINY_SD2_DIR`` / ``TINY_SDXL_DIR``);
the trained ones ship and load as ``load_model("tiny-sd2-v")`` and ``load_model("tiny-sdxl")`` (whose VAE is
the sd1 one refolded to SDXL's ``scaling_factor`` 0.13025 with ``force_upcast``, ``SDXL_VAE_CONFIG``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# ---------------------------------------------------------------------------------------------------------
# Where the trained model lives
# ---------------------------------------------------------------------------------------------------------

TINY_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "tiny"
"""The shipped diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
TINY_SD2_DIR: Path = TINY_DIR.parent / "tiny_sd2"
"""The shipped SD2-v-shaped tiny model ``tiny-sd2-v`` (a StableDiffusionPipeline folder written by
``train_tiny.py --family sd2``)."""
TINY_SDXL_DIR: Path = TINY_DIR.parent / "tiny_sdxl"
"""Where ``train_tiny.py --family sdxl`` writes the SDXL-shaped tiny model (a StableDiffusionXLPipeline folder)."""
FAMILIES = ("sd1", "sd2", "sdxl")

# ---------------------------------------------------------------------------------------------------------
# Component configurations
# ---------------------------------------------------------------------------------------------------------

IMAGE_SIZE = 128  # native resolution in pixels: UNET_CONFIG["sample_size"] × VAE downsampling factor
VAE_SCALE_FACTOR = 8  # 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)
LATENT_CHANNELS = 4
TEXT_HIDDEN_SIZE = 32
MAX_TEXT_LENGTH = 77  # CLIP's context length; prompts are padded / truncated to it

VOCAB_SIZE = 1280
"""Tokenizer size: 256 byte symbols, the same 256 ending a word (``</w>``), 766 BPE merges, 2 specials."""
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also the padding and unknown token, as in CLIP
BOS_TOKEN_ID = VOCAB_SIZE - 2  # CLIP puts its two special tokens last
EOS_TOKEN_ID = VOCAB_SIZE - 1

UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // VAE_SCALE_FACTOR,  # 16×16 latents
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "cross_attention_dim": TEXT_HIDDEN_SIZE,
    # diffusers reads SD1.x's attention_head_dim as the number of heads. SD1.x has 8 heads of 40–160 channels;
    # 8 heads of 4–8 channels here made attention ~60% of an inner step's CPU time (the 256×256 score matrices
    # dominate, as in no real SD); 2 heads keep multi-head attention with 16–32 channels a head.
    "attention_head_dim": 2,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

SD2_TEXT_HIDDEN_SIZE = 48
"""SD2.x's OpenCLIP ViT-H text width (1024) scaled down by the same factor as SD1's CLIP width (768 → 32)."""
SD2_PAD_TOKEN = "!"
"""SD2.x's OpenCLIP tokenizer pads with "!" (token 0), not with <|endoftext|> as CLIP does."""

SD2_UNET_CONFIG: dict[str, Any] = {
    **UNET_CONFIG,
    "cross_attention_dim": SD2_TEXT_HIDDEN_SIZE,
    "attention_head_dim": (2, 4, 8, 8),  # SD2.x gives one value per block ((5, 10, 20, 20)): 8 channels a head
    "use_linear_projection": True,  # SD2.x's transformers project in/out with Linear instead of 1×1 Conv
    "upcast_attention": False,
}

SDXL_TIME_EMBED_DIM = 8  # SDXL: 256 per add_time_ids entry
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // VAE_SCALE_FACTOR,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),  # SDXL's three levels
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 1, 2),  # SDXL: (1, 2, 10)
    "norm_num_groups": 32,
    "cross_attention_dim": 2 * TEXT_HIDDEN_SIZE,  # both encoders' hidden states concatenated (768 + 1280 in SDXL)
    "attention_head_dim": (2, 4, 8),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
    # pooled text_embeds of text_encoder_2 + 6 add_time_ids (original size, crop top-left, target size)
    "projection_class_embeddings_input_dim": TEXT_HIDDEN_SIZE + 6 * SDXL_TIME_EMBED_DIM,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (32, 32, 64, 64),  # 1.03 M parameters, ~2 MB in fp16 (32 at full size: +0.5 dB over 16)
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 0.18215,  # SD1.x's value; the trained latent space is rescaled so that this holds
}

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": TEXT_HIDDEN_SIZE,
    "intermediate_size": 4 * TEXT_HIDDEN_SIZE,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TEXT_LENGTH,
    "hidden_act": "quick_gelu",
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": EOS_TOKEN_ID,
}

SD2_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    **TEXT_ENCODER_CONFIG,
    "hidden_size": SD2_TEXT_HIDDEN_SIZE,
    "intermediate_size": 4 * SD2_TEXT_HIDDEN_SIZE,
    "hidden_act": "gelu",  # OpenCLIP ViT-H, as SD2.x's text encoder (diffusers keeps its first 23 of 24 layers)
    "pad_token_id": 0,  # "!" (SD2_PAD_TOKEN) is the first byte symbol of the vocabulary, as in OpenCLIP's
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

SD2_SCHEDULER_CONFIG: dict[str, Any] = {**SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
"""SD2.x (768-v): the same scaled-linear betas, the UNet predicts v = √ᾱ ε − √(1 − ᾱ) x₀."""

SDXL_SCHEDULER_CONFIG: dict[str, Any] = {**SCHEDULER_CONFIG, "timestep_spacing": "leading"}

SDXL_SCALING_FACTOR = 0.13025
"""SDXL's VAE ``scaling_factor``; the tiny SDXL's VAE is the sd1 one with its latent scale refolded to it."""
SDXL_VAE_CONFIG: dict[str, Any] = {**VAE_CONFIG, "scaling_factor": SDXL_SCALING_FACTOR, "force_upcast": True}
"""SDXL's VAE config keys at the tiny VAE's widths: ``force_upcast`` (SDXL's VAE overflows in fp16)."""

TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": TEXT_HIDDEN_SIZE,
    "intermediate_size": 4 * TEXT_HIDDEN_SIZE,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TEXT_LENGTH,
    "hidden_act": "gelu",  # OpenCLIP bigG, as SDXL's second encoder
    "projection_dim": TEXT_HIDDEN_SIZE,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": EOS_TOKEN_ID,
}

FAMILY_UNET_CONFIG = {"sd1": UNET_CONFIG, "sd2": SD2_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}
FAMILY_SCHEDULER_CONFIG = {"sd1": SCHEDULER_CONFIG, "sd2": SD2_SCHEDULER_CONFIG, "sdxl": SDXL_SCHEDULER_CONFIG}
FAMILY_DIR = {"sd1": TINY_DIR, "sd2": TINY_SD2_DIR, "sdxl": TINY_SDXL_DIR}

# ---------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------


def build_tokenizer(path: str | Path | None = None, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """Loads the shipped BPE tokenizer (``vocab.json`` + ``merges.txt``) as a ``CLIPTokenizer``.

    ``path`` defaults to ``TINY_DIR / "tokenizer"``. Lower-casing, CLIP's word split and the ``</w>``
    end-of-word suffix come from ``CLIPTokenizer`` itself; prompts are padded and truncated to 77 tokens.
    ``pad_token``: CLIP's ``<|endoftext|>`` (SD1.x) or OpenCLIP's ``"!"`` (``SD2_PAD_TOKEN``, SD2.x).
    """
    folder = Path(path) if path is not None else TINY_DIR / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"tokenizer file {folder / name} is missing; run scripts/train_tiny.py")
    # from_pretrained reads the folder's vocab.json and merges.txt in transformers 4 and 5 (the constructor's
    # arguments differ: file paths in 4, a dict and a list in 5)
    tokenizer = CLIPTokenizer.from_pretrained(
        folder,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=pad_token,
        unk_token=EOS_TOKEN,
        model_max_length=MAX_TEXT_LENGTH,
    )
    if len(tokenizer) != VOCAB_SIZE:
        raise ValueError(f"tokenizer in {folder} has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer


def build_scheduler() -> DDIMScheduler:
    """DDIM with SD1.x's scaled-linear betas and ``steps_offset=1``."""
    return DDIMScheduler(**SCHEDULER_CONFIG)


def build_random_components(seed: int = 0, tokenizer: CLIPTokenizer | None = None) -> dict[str, Any]:
    """The tiny pipeline's components with seeded random weights, for fast tests.

    Returns ``{"unet", "vae", "text_encoder", "tokenizer", "scheduler"}``, ready for
    ``StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
    requires_safety_checker=False)``. The same seed gives bit-identical weights. The models are in eval
    mode and fp32; a random UNet is no denoiser, so use these for equality tests, not for quality.
    ``tokenizer`` defaults to the shipped one (``build_tokenizer()``).
    """
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**copy.deepcopy(UNET_CONFIG))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**copy.deepcopy(VAE_CONFIG))
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    finally:
        torch.random.set_rng_state(generator_state)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer if tokenizer is not None else build_tokenizer(),
        "scheduler": build_scheduler(),
    }


def build_random_family_components(
    family: str, seed: int = 0, tokenizer: CLIPTokenizer | None = None, vae: AutoencoderKL | None = None
) -> dict[str, Any]:
    """Seeded random components of one tiny family ("sd1", "sd2", "sdxl"), with an optional shared VAE.

    sd1 and sd2 give ``StableDiffusionPipeline`` components; sdxl gives ``StableDiffusionXLPipeline``'s
    (``text_encoder`` = CLIPTextModel, ``text_encoder_2`` = CLIPTextModelWithProjection, both tokenizers the
    shipped one). For sd1 this equals ``build_random_components`` except for a passed-in ``vae``. sd2 has
    its own wider, GELU text encoder (``SD2_TEXT_ENCODER_CONFIG``) and a tokenizer padding with "!" (the
    default ``tokenizer`` is the shipped one with ``pad_token=SD2_PAD_TOKEN``).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    from diffusers import DDIMScheduler as _DDIM
    from transformers import CLIPTextModelWithProjection

    if tokenizer is None and family == "sd2":
        tokenizer = build_tokenizer(pad_token=SD2_PAD_TOKEN)
    base = build_random_components(seed, tokenizer=tokenizer)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**copy.deepcopy(FAMILY_UNET_CONFIG[family]))
        if family == "sd2":
            torch.manual_seed(seed + 2)
            base["text_encoder"] = CLIPTextModel(CLIPTextConfig(**SD2_TEXT_ENCODER_CONFIG)).eval()
        torch.manual_seed(seed + 3)
        text_encoder_2 = (
            CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2_CONFIG)) if family == "sdxl" else None
        )
    finally:
        torch.random.set_rng_state(generator_state)
    out = {**base, "unet": unet.eval(), "scheduler": _DDIM(**FAMILY_SCHEDULER_CONFIG[family])}
    if vae is not None:
        out["vae"] = vae
    elif family == "sdxl":
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed + 1)
            out["vae"] = AutoencoderKL(**copy.deepcopy(SDXL_VAE_CONFIG)).eval()
        finally:
            torch.random.set_rng_state(generator_state)
    if family == "sdxl":
        out["text_encoder_2"] = text_encoder_2.eval()
        out["tokenizer_2"] = out["tokenizer"]
    return out
