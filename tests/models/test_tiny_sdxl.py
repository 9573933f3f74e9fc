"""The embedded SDXL-shaped model ``tiny-sdxl`` end to end (issue #17): Null-text Inversion's effect (Mokady et
al. 2023) with SDXL's conditioning (two encoders, pooled embedding, time ids), the saved record, batching,
kill -9 resume of ``nti invert``, and Prompt-to-Prompt's edits on SDXL's attention layout."""

from __future__ import annotations

import json

import pytest
import torch
from oracles import assert_nti_beats_cfg
from run_outputs import assert_same_as_reference, read_nulls
from run_outputs import invert_args as _args
from run_outputs import spawn_invert as _spawn
from run_outputs import wait_for as _wait_for

from nti_lightning import invert, load_inversion, load_model, save_inversion
from nti_lightning.api import reconstruction_latents
from nti_lightning.cli import main
from nti_lightning.models.family import SDXLFamily
from nti_lightning.models.loading import ASSETS_DIR
from nti_lightning.p2p import edit
from nti_lightning.store.codec_names import LOSSLESS_CODEC

T = 10  # small to keep the test short (ratio ≈ 5× here); docs/tiny_model.md: T = 20, ≥ 17×
IMAGE, PROMPT = ASSETS_DIR / "samples" / "cat.png", "a photo of a cat"
IDS = ["img0", "img1"]  # the kill -9 run's images (conftest.noise_dataset)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl():
    return load_model("tiny-sdxl")


@pytest.fixture(scope="module")
def inverted(sdxl):
    return invert(sdxl, [str(IMAGE)], [PROMPT], num_ddim_steps=T)[0]


@pytest.fixture(scope="module")
def reconstruction(sdxl, inverted):
    return reconstruction_latents(sdxl, [inverted])


def _mse(a, b) -> float:
    return (a.float() - b.float()).pow(2).mean().item()


def test_shipped_model_is_sdxl_shaped(sdxl):
    fam = sdxl.family
    assert isinstance(fam, SDXLFamily) and (fam.name, fam.native_image_size, fam.scaling_factor) == (
        "sdxl",
        128,
        0.13025,
    )
    assert fam.vae_force_upcast and not fam.force_zeros_for_empty_prompt and fam.pooled_width == 32
    assert fam.attention.text_width == 64 and fam.learnable == ("prompt_embeds", "text_embeds")
    assert sdxl.text_encoder_2 is not None and sdxl.unet.config.addition_embed_type == "text_time"
    assert [len(getattr(b, "attentions", [])) for b in sdxl.unet.down_blocks] == [0, 1, 1]  # none in the first


def test_folder_is_a_few_mb():
    total = sum(p.stat().st_size for p in (ASSETS_DIR / "tiny_sdxl").rglob("*") if p.is_file())
    assert total <= 5 * 2**20, f"tiny_sdxl is {total / 2**20:.2f} MiB"


def test_nti_beats_ddim_with_guidance(sdxl, inverted, reconstruction):
    """The paper's premise on SDXL's conditioning: DDIM inversion replayed at w = 7.5 misses; NTI restores it."""
    assert_nti_beats_cfg(sdxl, inverted, reconstruction, ratio=4)


def test_save_load_reconstruct_round_trip(sdxl, inverted, reconstruction, tmp_path, tiny_model):
    assert inverted.meta["family"] == "sdxl" and set(inverted.null_extra) == {"text_embeds"}
    path = save_inversion(tmp_path / "cat", inverted, codec=LOSSLESS_CODEC)
    back = load_inversion(path, sdxl)
    assert torch.equal(back.null_extra["text_embeds"], inverted.null_extra["text_embeds"])
    assert torch.equal(reconstruction_latents(sdxl, [back]), reconstruction)
    with pytest.raises(ValueError, match="family sdxl"):
        load_inversion(path, tiny_model)


def test_batch_equals_single(sdxl):
    images = [str(IMAGE), str(ASSETS_DIR / "samples" / "coffee.png")]
    prompts = [PROMPT, "a cup of coffee on a table"]
    fast = dict(num_ddim_steps=3, num_inner_steps=3, batch_invariant=True)
    both = invert(sdxl, images, prompts, batch_size=2, **fast)
    for img, prompt, inv in zip(images, prompts, both):
        alone = invert(sdxl, [img], [prompt], batch_size=1, **fast)[0]
        assert torch.equal(alone.null_embeddings, inv.null_embeddings)
        assert torch.equal(alone.null_extra["text_embeds"], inv.null_extra["text_embeds"])


def test_identity_edit_reproduces_the_reconstruction(sdxl, inverted, reconstruction):
    result = edit(sdxl, inverted, PROMPT)  # P2P's processors (explicit softmax) and a batch of 2: rounding only
    assert (result.latents[0] - reconstruction[0]).abs().max().item() <= 1e-4
    assert (result.latents[1] - result.latents[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "target, kwargs, mode",
    [
        ("a photo of a dog", {}, "replace"),
        ("a photo of a small cat", {}, "refine"),
        (PROMPT, {"reweight": {"cat": 2.0}}, "reweight"),
        ("a photo of a dog", {"blend_words": ["cat", "dog"]}, "replace"),
    ],
    ids=["replace", "refine", "reweight", "local-blend"],
)
def test_p2p_edits_run_on_sdxl(sdxl, inverted, reconstruction, target, kwargs, mode):
    result = edit(sdxl, inverted, target, return_attention=True, **kwargs)
    assert result.modes == [mode] and torch.isfinite(result.latents).all()
    assert (result.latents[0] - reconstruction[0]).abs().max().item() <= 1e-3  # the source row stays
    assert _mse(result.latents[1], result.latents[0]) > 1e-6  # the edit changed the target
    assert result.attention.shape == (2, 4, 4, 77)  # 4 × 4 maps of the 16 × 16 latent (SDXL: 32² of 128²)
    if "blend_words" in kwargs:
        assert result.blend_mask is not None and result.blend_mask.shape == (1, 1, 16, 16)


@pytest.mark.slow  # multi-process: CI runs it (-m slow); the README test command skips it
def test_kill_9_resume_is_bit_identical(noise_dataset, tmp_path):
    """``nti invert --model tiny-sdxl`` killed with SIGKILL after its first checkpoint, then rerun: every record
    equals an uninterrupted run's, prompt_embeds and pooled text_embeds alike (helpers of run_outputs)."""
    ref = tmp_path / "ref"
    assert main(_args(noise_dataset, ref, "tiny-sdxl")) == 0
    reference = read_nulls(ref)
    meta = json.loads((ref / "images" / "img0" / "meta.json").read_text())
    assert (meta["family"], meta["model_source"]) == ("sdxl", "tiny-sdxl")
    out = tmp_path / "kill"
    proc = _spawn(noise_dataset, out, "tiny-sdxl")
    _wait_for(lambda: (out / "checkpoints" / "shard0.rank0.pt").is_file(), proc)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()
    proc.communicate(timeout=60)
    assert main(_args(noise_dataset, out, "tiny-sdxl")) == 0
    assert "resuming " in (out / "logs" / "rank0.log").read_text()  # from the killed run's checkpoint
    assert_same_as_reference(out, reference, IDS)
    for k in IDS:
        a = load_inversion(ref / "images" / k / "inversion.safetensors").null_extra["text_embeds"]
        assert torch.equal(a, load_inversion(out / "images" / k / "inversion.safetensors").null_extra["text_embeds"])
