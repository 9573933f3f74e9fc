"""The embedded default model (``nti_lightning/assets/tiny``) and its random-weight twin: fast checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from nti_lightning.models import tiny

SIZE_CAP_BYTES = 8 * 1024 * 1024
SAMPLES_DIR = tiny.TINY_DIR.parent / "samples"


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return StableDiffusionPipeline.from_pretrained(
            tiny.TINY_DIR, safety_checker=None, requires_safety_checker=False
        )


def image_tensor(path, size: int = tiny.IMAGE_SIZE) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((size, size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32))  # (H, W, 3)
    return (x / 127.5 - 1).permute(2, 0, 1)[None]  # (1, 3, H, W)


# ---------------------------------------------------------------------------------------------------------
# The shipped folder
# ---------------------------------------------------------------------------------------------------------


def test_shipped_folder_loads_offline_as_fp32(pipe):
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_shipped_configs_match_module_constants(pipe):
    for model, expected in ((pipe.unet, tiny.UNET_CONFIG), (pipe.vae, tiny.VAE_CONFIG)):
        for key, value in expected.items():
            got = model.config[key]
            assert (list(got) if isinstance(got, (list, tuple)) else got) == (
                list(value) if isinstance(value, tuple) else value
            ), key
    for key, value in tiny.TEXT_ENCODER_CONFIG.items():
        assert getattr(pipe.text_encoder.config, key) == value, key
    for key, value in tiny.SCHEDULER_CONFIG.items():
        assert pipe.scheduler.config[key] == value, key


def test_scheduler_gives_the_authors_timesteps(pipe):
    pipe.scheduler.set_timesteps(50)
    assert pipe.scheduler.timesteps.tolist() == list(range(981, 0, -20))


def test_shapes_128px_image_to_16x16_latents(pipe):
    x = image_tensor(SAMPLES_DIR / "cat.png")  # (1, 3, 128, 128)
    with torch.no_grad():
        latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt")
        text = pipe.text_encoder(ids.input_ids)[0]
        eps = pipe.unet(latents, 981, text).sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    assert latents.shape == (1, 4, 16, 16)
    assert text.shape == (1, 77, tiny.TEXT_HIDDEN_SIZE)
    assert eps.shape == latents.shape
    assert image.shape == x.shape


def test_latent_space_is_scaled_to_unit_std(pipe):
    """scaling_factor · E(x) has std ≈ 1 (trained statistic; loose bounds for held-out photos)."""
    x = torch.cat([image_tensor(SAMPLES_DIR / r["image"]) for r in read_captions()])
    with torch.no_grad():
        latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    assert 0.5 < latents.std().item() < 2.0


def test_folder_size_stays_under_cap():
    total = sum(p.stat().st_size for p in tiny.TINY_DIR.rglob("*") if p.is_file())
    assert total <= SIZE_CAP_BYTES, f"{tiny.TINY_DIR} is {total / 2**20:.2f} MiB"


def test_shared_weights_are_stored_once_and_load_as_tiny_s():
    """tiny-sd2-v and tiny-sdxl keep only the configs of the VAE (and SDXL of its first text encoder): the weights
    load from assets/tiny, bitwise for sd2; for SDXL refolded to 0.13025, giving the same scaled latents."""
    from nti_lightning.models.embedded import SHARED_WEIGHTS
    from nti_lightning.models.loading import load_model

    for folder, parts in SHARED_WEIGHTS.items():
        for part in parts:
            files = sorted(p.name for p in (tiny.TINY_DIR.parent / folder / part).iterdir())
            assert files == ["config.json"], f"{folder}/{part} holds {files}"
    assets = [p for name in ("tiny", *SHARED_WEIGHTS) for p in (tiny.TINY_DIR.parent / name).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in assets) <= 14 * 2**20
    base, sd2, sdxl = (load_model(name) for name in ("tiny", "tiny-sd2-v", "tiny-sdxl"))
    for key, value in base.vae.state_dict().items():
        assert torch.equal(sd2.vae.state_dict()[key], value), key
    for key, value in base.text_encoder.state_dict().items():
        assert torch.equal(sdxl.text_encoder.state_dict()[key], value), key
    assert (sdxl.vae.config.scaling_factor, sdxl.vae.config.force_upcast) == (tiny.SDXL_SCALING_FACTOR, True)
    x = image_tensor(SAMPLES_DIR / "cat.png")
    with torch.no_grad():
        z_base = base.vae.encode(x).latent_dist.mean * base.vae.config.scaling_factor
        z_xl = sdxl.vae.encode(x).latent_dist.mean * sdxl.vae.config.scaling_factor
        torch.testing.assert_close(z_xl, z_base, rtol=1e-5, atol=1e-5)
        out_base = base.vae.decode(z_base / base.vae.config.scaling_factor).sample
        out_xl = sdxl.vae.decode(z_xl / sdxl.vae.config.scaling_factor).sample
        torch.testing.assert_close(out_xl, out_base, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def test_tokenizer_pads_to_77_and_round_trips_captions(pipe):
    tokenizer = tiny.build_tokenizer()
    assert len(tokenizer) == tiny.VOCAB_SIZE
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tiny.BOS_TOKEN_ID and ids[-1] == tiny.EOS_TOKEN_ID
    for row in read_captions():
        encoded = tokenizer(row["prompt"]).input_ids
        assert tokenizer.decode(encoded, skip_special_tokens=True) == row["prompt"]
        assert pipe.tokenizer(row["prompt"]).input_ids == encoded  # tokenizer.json agrees with vocab/merges


def test_tokenizer_has_single_and_multi_token_words():
    tokenizer = tiny.build_tokenizer()

    def n_tokens(word: str) -> int:
        return len(tokenizer(word, add_special_tokens=False).input_ids)

    assert all(n_tokens(w) == 1 for w in ("a", "photo", "cat", "dog", "coffee", "red", "table"))
    assert all(n_tokens(w) > 1 for w in ("astronaut", "kangaroo"))


# ---------------------------------------------------------------------------------------------------------
# Random components and samples
# ---------------------------------------------------------------------------------------------------------


def test_build_random_components_is_deterministic():
    a, b, c = (tiny.build_random_components(seed) for seed in (0, 0, 1))
    assert set(a) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (x[name].state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name


def test_random_components_do_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_random_components(0)
    assert torch.equal(torch.rand(3), expected)


def read_captions() -> list[dict]:
    lines = (SAMPLES_DIR / "captions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_samples_listed_in_captions_exist():
    rows = read_captions()
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"image", "prompt"}
        assert Image.open(SAMPLES_DIR / row["image"]).size == (256, 256)
