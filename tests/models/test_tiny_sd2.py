"""The embedded SD2-shaped v-prediction model ``tiny-sd2-v`` end to end (issue #16): Null-text Inversion's effect
(Mokady et al. 2023) with v-prediction (Salimans & Ho 2022), the saved record, and Prompt-to-Prompt edits."""

from __future__ import annotations

import pytest
import torch
from oracles import assert_nti_beats_cfg

from nti_lightning import invert, load_inversion, load_model, save_inversion
from nti_lightning.api import reconstruction_latents
from nti_lightning.models.loading import ASSETS_DIR
from nti_lightning.p2p import edit
from nti_lightning.store.codec_names import LOSSLESS_CODEC

T, SIZE = 10, 64  # small to keep the test short (ratio ≈ 8× here); docs/tiny_model.md: T = 20, 128 px, ≥ 44×
IMAGE, PROMPT = ASSETS_DIR / "samples" / "cat.png", "a photo of a cat"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: one intra-op thread


@pytest.fixture(scope="module")
def sd2v():
    return load_model("tiny-sd2-v")


@pytest.fixture(scope="module")
def inverted(sd2v):
    return invert(sd2v, [str(IMAGE)], [PROMPT], num_ddim_steps=T, image_size=SIZE)[0]


@pytest.fixture(scope="module")
def reconstruction(sd2v, inverted):
    return reconstruction_latents(sd2v, [inverted])


def _mse(a, b) -> float:
    return (a.float() - b.float()).pow(2).mean().item()


def test_shipped_model_is_sd2_shaped(sd2v):
    fam = sd2v.family
    assert (fam.name, fam.prediction_type, fam.native_image_size) == ("sd2-v", "v_prediction", 128)
    assert fam.attention.linear_projection and fam.attention.text_width == 48
    assert sd2v.tokenizer.pad_token == "!" and sd2v.scheduler.config.prediction_type == "v_prediction"
    assert sd2v.text_encoder.config.hidden_act == "gelu"


def test_folder_is_a_few_mb():
    total = sum(p.stat().st_size for p in (ASSETS_DIR / "tiny_sd2").rglob("*") if p.is_file())
    assert total <= 4.5 * 2**20, f"tiny_sd2 is {total / 2**20:.2f} MiB"


def test_nti_beats_ddim_with_guidance(sd2v, inverted, reconstruction):
    """The paper's premise on a v model: replaying DDIM inversion at w = 7.5 misses; NTI restores it."""
    assert_nti_beats_cfg(sd2v, inverted, reconstruction, ratio=4)


def test_record_names_family_and_round_trips(sd2v, inverted, tmp_path, tiny_model):
    assert inverted.meta["family"] == "sd2-v" and inverted.meta["prediction_type"] == "v_prediction"
    assert inverted.meta["scheduler"]["prediction_type"] == "v_prediction"
    path = save_inversion(tmp_path / "cat", inverted, codec=LOSSLESS_CODEC)
    back = load_inversion(path, sd2v)
    assert torch.equal(back.null_embeddings, inverted.null_embeddings) and back.null_embeddings.shape[-1] == 48
    with pytest.raises(ValueError, match="family sd2-v"):
        load_inversion(path, tiny_model)


def test_identity_edit_reproduces_the_reconstruction(sd2v, inverted, reconstruction):
    result = edit(sd2v, inverted, PROMPT)  # P2P's processors (explicit softmax) and a batch of 2: rounding only
    assert (result.latents[0] - reconstruction[0]).abs().max().item() <= 1e-4
    assert (result.latents[1] - result.latents[0]).abs().max().item() <= 1e-4


def test_word_swap_edit_runs(sd2v, inverted, reconstruction):
    result = edit(sd2v, inverted, "a photo of a dog", blend_words=["cat", "dog"])
    assert result.modes == ["replace"] and len(result.images) == 2
    assert torch.isfinite(result.latents).all()
    assert (result.latents[0] - reconstruction[0]).abs().max().item() <= 1e-3  # the source row stays
    assert _mse(result.latents[1], result.latents[0]) > 0
