"""SDXL (issue #17) on the tiny random SDXL-shaped model: detection from folders, the conditioning against
diffusers' own ``encode_prompt``, the external oracle (our sampler = ``StableDiffusionXLPipeline``), the null
per ``force_zeros_for_empty_prompt``, what NTI optimises (``inversion.optimize``) and the fp16 VAE upcast."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from oracles import sampler_and_pipeline

from nti_lightning import invert
from nti_lightning.api import reconstruction_latents
from nti_lightning.engine.ddim import schedule_from_scheduler
from nti_lightning.engine.sampling import ddim_sample, decode_latents, encode_latents, unet_denoiser
from nti_lightning.models import load_model, model_from_components
from nti_lightning.models.detect import ModelFolderError
from nti_lightning.models.family import SDXLFamily
from nti_lightning.models.tiny import build_random_family_components
from nti_lightning.store.codec_names import LOSSLESS_CODEC
from nti_lightning.store.inversion import load_inversion, save_inversion

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: one intra-op thread


def _sdxl(force_zeros: bool = True, seed: int = 0):
    comps = build_random_family_components("sdxl", seed)
    return model_from_components(**comps, source="tiny-sdxl-random", force_zeros_for_empty_prompt=force_zeros)


@pytest.fixture(scope="module")
def sdxl():
    return _sdxl(force_zeros=False)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory, sdxl):
    d = tmp_path_factory.mktemp("sdxl")
    sdxl.pipeline.save_pretrained(d)
    return d


def _image(seed: int = 0, side: int = 64) -> np.ndarray:
    return (np.random.default_rng(seed).random((side, side, 3)) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Detection and conditioning
# ---------------------------------------------------------------------------------------------------------


def test_sdxl_folder_is_detected(tmp_path, sdxl, sdxl_dir):
    fam = load_model(sdxl_dir).family
    assert isinstance(fam, SDXLFamily) and fam == sdxl.family
    assert (fam.name, fam.native_image_size, fam.scaling_factor, fam.pooled_width) == ("sdxl", 128, 0.13025, 32)
    assert fam.vae_force_upcast and not fam.force_zeros_for_empty_prompt
    assert fam.attention.text_width == 64 and fam.attention.heads == (2, 4, 8) and fam.learnable[1] == "text_embeds"
    assert load_model(sdxl_dir).fingerprint == sdxl.fingerprint
    d = tmp_path / "zeros"
    shutil.copytree(sdxl_dir, d)
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": True}))
    assert load_model(d).family.force_zeros_for_empty_prompt
    shutil.rmtree(d / "text_encoder_2")
    with pytest.raises(ModelFolderError, match="text_encoder_2/config.json"):
        load_model(d)


def test_sdxl_base_configs_give_sdxl_numbers():
    """SDXL base 1.0's own configs: 1024 px, scaling 0.13025, text width 2048, pooled 1280, zero null."""
    from nti_bench.sdxl import SDXL_UNET_CONFIG
    from nti_lightning.models.family import family_from_configs
    from nti_lightning.models.tiny import SDXL_SCHEDULER_CONFIG

    vae = {"block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.13025, "force_upcast": True}
    fam = family_from_configs(SDXL_UNET_CONFIG, vae, SDXL_SCHEDULER_CONFIG, 77, {"force_zeros_for_empty_prompt": True})
    assert (fam.name, fam.native_image_size, fam.scaling_factor, fam.pooled_width) == ("sdxl", 1024, 0.13025, 1280)
    assert fam.attention.text_width == 2048 and fam.attention.heads == (5, 10, 20) and fam.force_zeros_for_empty_prompt
    assert fam.time_ids(1).tolist() == [[1024, 1024, 0, 0, 1024, 1024]] and fam.vae_force_upcast


def test_sdxl_unet_without_second_encoder_is_a_clear_error():
    comps = build_random_family_components("sdxl", 0)
    del comps["text_encoder_2"], comps["tokenizer_2"]
    with pytest.raises(ModelFolderError, match="needs text_encoder_2 and tokenizer_2"):
        model_from_components(**comps)


def test_conditioning_equals_encode_prompt(sdxl):
    """ψ(P) = both encoders' penultimate states concatenated (B, 77, D₁ + D₂) and the pooled (B, D₂), as
    StableDiffusionXLPipeline.encode_prompt; time ids (native, native, 0, 0, native, native)."""
    prompts = ["a photo of a cat", "a dog on the grass"]
    cond = sdxl.family.encode_prompts(sdxl, prompts)
    pos, neg, pooled, neg_pooled = sdxl.pipeline.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
    assert cond["prompt_embeds"].shape == (2, 77, 64) and cond["text_embeds"].shape == (2, 32)
    assert torch.equal(cond["prompt_embeds"], pos) and torch.equal(cond["text_embeds"], pooled)
    assert cond["time_ids"].tolist() == [[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2
    null = sdxl.family.null(sdxl, 2)  # force_zeros_for_empty_prompt false: ψ("") (one row, diffusers encodes two)
    torch.testing.assert_close(null["prompt_embeds"], neg, atol=1e-6, rtol=0)
    torch.testing.assert_close(null["text_embeds"], neg_pooled, atol=1e-6, rtol=0)
    assert null["prompt_embeds"].abs().max() > 0.1


def test_null_is_zeros_when_the_config_says_so():
    model = _sdxl(force_zeros=True)
    null = model.family.null(model, 3)
    assert null["prompt_embeds"].shape == (3, 77, 64) and not null["prompt_embeds"].any()
    assert not null["text_embeds"].any() and null["time_ids"][0].tolist() == [128, 128, 0, 0, 128, 128]
    _, neg, _, neg_pooled = model.pipeline.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=True)
    assert not neg.any() and not neg_pooled.any()  # diffusers' null too


@pytest.mark.parametrize("force_zeros", [True, False], ids=["zeros-null", "empty-prompt-null"])
def test_sampler_equals_stable_diffusion_xl_pipeline(force_zeros):
    """External oracle: every ∅_t = the model's null, our guided DDIM sampler from z_T is diffusers'
    StableDiffusionXLPipeline(latents=z_T, guidance_scale=7.5) (guidance_rescale 0, original = target size =
    the default height/width, crop (0, 0), the negative prompt per force_zeros_for_empty_prompt)."""
    model = _sdxl(force_zeros=force_zeros, seed=1)
    T, prompt = 6, "a photo of a cat"
    ours, theirs = sampler_and_pipeline(model, T, prompt)
    assert ours.abs().max() > 1.0  # a real trajectory, not zeros
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_time_ids_follow_the_image_size():
    """At another size the time ids are (s, s, 0, 0, s, s), as the pipeline's at height = width = s; inversions
    made there are replayed with them."""
    model = _sdxl(force_zeros=False, seed=3)
    fam = model.family.at_size(64)
    assert fam.time_ids(1).tolist() == [[64, 64, 0, 0, 64, 64]] and model.family.at_size(128) == model.family
    T, prompt = 4, "a photo of a cat"
    z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    schedule = schedule_from_scheduler(model.scheduler, T)
    ours = ddim_sample(unet_denoiser(model.unet, fam), schedule, z_T, fam.encode_prompts(model, [prompt]),
                       fam.null(model), 7.5)  # fmt: skip
    theirs = model.pipeline(
        prompt, height=64, width=64, latents=z_T.clone(), guidance_scale=7.5, num_inference_steps=T,
        output_type="latent",
    ).images  # fmt: skip
    assert (ours - theirs).abs().max().item() <= 1e-5
    inv = invert(model, [_image()], [prompt], num_ddim_steps=2, num_inner_steps=1, image_size=64)[0]
    assert inv.null(0, model)["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]


# ---------------------------------------------------------------------------------------------------------
# What NTI optimises
# ---------------------------------------------------------------------------------------------------------


def test_default_optimises_prompt_embeds_and_pooled_and_round_trips(tmp_path, sdxl):
    inv = invert(sdxl, [_image()], ["a photo of a cat"], num_ddim_steps=3, num_inner_steps=2, image_size=64)[0]
    assert inv.meta["family"] == "sdxl" and inv.meta["hyperparameters"]["optimize"] is None
    assert inv.null_embeddings.shape == (3, 77, 64) and set(inv.null_extra) == {"text_embeds"}
    null = sdxl.family.null(sdxl)
    assert not torch.equal(inv.null_extra["text_embeds"][-1], null["text_embeds"][0])  # it moved
    assert inv.null(0, sdxl)["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]  # not optimised: the null's at 64 px
    loaded = load_inversion(save_inversion(tmp_path / "inv", inv, codec=LOSSLESS_CODEC), sdxl)
    assert torch.equal(loaded.null_extra["text_embeds"], inv.null_extra["text_embeds"])
    assert torch.equal(reconstruction_latents(sdxl, [loaded]), reconstruction_latents(sdxl, [inv]))


def test_time_ids_are_optimised_on_request(sdxl):
    keys = ["prompt_embeds", "text_embeds", "time_ids"]
    inv = invert(sdxl, [_image(1)], ["a photo of a cat"], num_ddim_steps=2, num_inner_steps=2, image_size=64,
                 optimize=keys)[0]  # fmt: skip
    assert set(inv.null_extra) == {"text_embeds", "time_ids"} and inv.null_extra["time_ids"].shape == (2, 6)
    native = torch.tensor([128.0, 128, 0, 0, 128, 128])
    assert (inv.null_extra["time_ids"][-1] - native).abs().max() > 1e-4


def test_unknown_optimise_key_is_a_clear_error(sdxl, tiny_model):
    with pytest.raises(ValueError, match="pooled embedding is text_embeds"):
        invert(sdxl, [_image()], ["a cat"], num_ddim_steps=2, num_inner_steps=1, image_size=64,
               optimize=["prompt_embeds", "pooled"])  # fmt: skip
    with pytest.raises(ValueError, match=r"sd1 null has the keys \['prompt_embeds'\]"):
        invert(tiny_model, [_image()], ["a cat"], num_ddim_steps=2, num_inner_steps=1, optimize=["text_embeds"])


# ---------------------------------------------------------------------------------------------------------
# The fp16 VAE overflow
# ---------------------------------------------------------------------------------------------------------


def _overflowing_fp16_vae_model(force_upcast: bool):
    """A model whose VAE decoder's first conv outputs ~1e6 (fine in fp32, inf in fp16: max 65504), stored in fp16."""
    model = _sdxl(seed=2)
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.mul_(3e4)
        model.vae.decoder.conv_in.bias.mul_(3e4)
    model.vae.to(torch.float16)
    model.family = dataclasses.replace(model.family, vae_force_upcast=force_upcast)
    dtypes = []
    model.vae.decoder.conv_in.register_forward_pre_hook(lambda mod, args: dtypes.append(args[0].dtype))
    return model, dtypes


@pytest.mark.parametrize("force_upcast", [True, False], ids=["force_upcast", "detect-and-retry"])
def test_overflowing_fp16_vae_decodes_in_fp32(force_upcast):
    model, dtypes = _overflowing_fp16_vae_model(force_upcast)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = model.vae.decode((z / model.scaling_factor).half()).sample
    assert not torch.isfinite(raw).all()  # the overflow is real
    dtypes.clear()
    out = decode_latents(model, z)
    assert dtypes == ([torch.float32] if force_upcast else [torch.float16, torch.float32])
    assert model.vae.dtype == torch.float16  # upcast for the call only
    reference = model.vae.float()  # the same fp16-rounded weights in fp32
    expected = reference.decode(z / model.scaling_factor).sample.clamp(-1, 1)
    model.vae.half()
    assert torch.isfinite(out).all() and torch.equal(out, expected.detach())


def test_encode_runs_in_fp32_when_forced():
    model, _ = _overflowing_fp16_vae_model(force_upcast=True)
    seen = []
    model.vae.encoder.conv_in.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    z = encode_latents(model, torch.rand(1, 3, 32, 32) * 2 - 1)
    assert seen == [torch.float32] and z.dtype == torch.float32 and model.vae.dtype == torch.float16


# ---------------------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------------------


def test_flops_are_counted_for_text_time_unets():
    """The counter feeds SDXL's added inputs; the backward reaches text_embeds; SDXL base's shape is exact."""
    from nti_bench.flops import count_unet_flops, meta_unet
    from nti_bench.sdxl import SDXL_UNET_CONFIG
    from nti_lightning.models.tiny import SDXL_UNET_CONFIG as TINY_SDXL

    small, large = count_unet_flops(TINY_SDXL, latent_size=8), count_unet_flops(TINY_SDXL, latent_size=16)
    assert 0 < small.forward < large.forward and small.backward > 0.5 * small.forward
    unet, _ = meta_unet(SDXL_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0
    assert [len(b.attentions) if hasattr(b, "attentions") else 0 for b in unet.down_blocks] == [0, 2, 2]
    assert unet.down_blocks[2].attentions[0].transformer_blocks.__len__() == 10


def test_unet_step_benchmark_takes_sdxl(tmp_path):
    """scripts/bench_unet_step.py times the inner step of an SDXL UNet (backward to prompt_embeds and text_embeds)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_unet_step.py"
    spec = importlib.util.spec_from_file_location("nti_step_script_sdxl", script)
    step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step)
    argv = ["--model", "tiny-sdxl", "--batch-sizes", "2", "--variants", "eager", "--iters", "1", "--warmup", "0"]
    assert step.main([*argv, "--rounds", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert [(r["batch_size"], r["variant"]) for r in rows] == [(2, "eager")] and rows[0]["ms_per_step"] > 0
    unet = load_model("tiny-sdxl").unet
    leaves, kwargs = step.null_inputs(unet, 2, torch.device("cpu"))
    unet(torch.randn(2, 4, 16, 16), torch.tensor(501), **kwargs).sample.square().mean().backward()
    assert [tuple(x.grad.shape) for x in leaves] == [(2, 77, 64), (2, 32)] and leaves[1].grad.abs().sum() > 0
