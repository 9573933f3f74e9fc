"""The benchmark's pieces: the authors' loop equals the engine, FLOP counts, the script end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from nti_bench import build_bench_model, prompts_for, synthetic_images, tiny_random_components
from nti_bench.flops import count_unet_flops, floor_flops, inversion_calls
from nti_lightning.config import InversionConfig
from nti_lightning.engine.reference import baseline_invert
from nti_lightning.engine.slots import Admission, Finished, SlotEngine
from nti_lightning.models import model_from_components
from nti_lightning.models.tiny import UNET_CONFIG
from nti_lightning.p2p.attention import P2PAttnProcessor, place_in_unet

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64  # 8×8 latents: the tiny UNet's smallest size, fast on CPU
NATIVE = 128  # 16×16 latents; at 8×8 the random UNet's 1×1 bottleneck (GroupNorm over 2 values) turns
# batch-size rounding (1e-6) into O(0.1) differences, so batched comparisons use the native size


def authors_attention(name: str):
    """Their ``register_attention_control``: every attention layer through an explicit softmax (an identity
    Prompt-to-Prompt controller)."""
    return P2PAttnProcessor(lambda a, c, p: a, place_in_unet(name))


@pytest.fixture(scope="module")
def model():
    return model_from_components(**tiny_random_components(seed=0), source="tiny-random")


def _engine(model, pixels, prompts, cfg, rows):
    engine = SlotEngine(model, cfg, rows)
    adm = [Admission(k, px, p) for k, (px, p) in enumerate(zip(pixels, prompts))]
    out = {ev.tag: ev.inversion for ev in engine.run(adm) if isinstance(ev, Finished)}
    return [out[k] for k in range(len(adm))]


def test_baseline_equals_engine_in_the_package_call_structure(model):
    """Batch 1, fp32, frozen weights, the conditional ε reused for z̄_{t−1}: the authors' loop with
    ``torch.optim.Adam`` and the slot engine with its per-row Adam do the same arithmetic — identical bits."""
    cfg = InversionConfig(num_ddim_steps=3, num_inner_steps=2, image_size=SIZE)
    pixels, prompts = synthetic_images(1, SIZE), prompts_for(1)
    base = baseline_invert(model, pixels, prompts[0], cfg, weights_grad=False, recompute_cond=False)
    assert base.unet_calls == {"pivot": 3, "cond": 3, "uncond_grad": 6, "final_batched": 0, "uncond": 3}
    assert base.null_embeddings.shape == (3, 77, model.text_encoder.config.hidden_size)
    (same,) = _engine(model, pixels, prompts, cfg, rows=1)
    for name in ("null_embeddings", "z_0", "z_T", "inner_steps"):
        assert torch.equal(getattr(same, name), getattr(base, name)), name


def test_baseline_as_distributed_matches_to_rounding(model):
    """The authors' code as distributed (weights requiring grad, their explicit-softmax attention hook, the
    conditional branch recomputed in a batched pair): the same pivot, the reconstruction equal to rounding."""
    cfg = InversionConfig(num_ddim_steps=3, num_inner_steps=2, image_size=NATIVE)
    pixels, prompts = synthetic_images(1, NATIVE), prompts_for(1)
    base = baseline_invert(model, pixels, prompts[0], cfg, weights_grad=True, classic_attention=authors_attention)
    assert base.unet_calls == {"pivot": 3, "cond": 3, "uncond_grad": 6, "final_batched": 3}
    assert all(p.grad is None and not p.requires_grad for p in model.unet.parameters())  # restored
    assert all(type(p).__name__ != "P2PAttnProcessor" for p in model.unet.attn_processors.values())
    (fast,) = _engine(model, pixels, prompts, cfg, rows=1)
    torch.testing.assert_close(fast.z_T, base.z_T, atol=1e-3, rtol=0)
    # how far rounding travels depends on the CPU's kernels (AVX2 vs AVX-512): 2e-3 max here on AVX-512
    torch.testing.assert_close(fast.z_0, base.z_0, atol=1e-2, rtol=0)
    assert (fast.z_0 - base.z_0).norm() / base.z_0.norm() < 2e-3


@pytest.mark.slow
def test_batched_engine_reproduces_the_baseline_per_image(model):
    cfg = InversionConfig(num_ddim_steps=2, num_inner_steps=2, image_size=NATIVE)
    pixels, prompts = synthetic_images(3, NATIVE, seed=1), prompts_for(3)
    results = _engine(model, pixels, prompts, cfg, rows=2)
    for k in range(3):
        base = baseline_invert(model, pixels[k : k + 1], prompts[k], cfg)
        torch.testing.assert_close(results[k].z_T, base.z_T, atol=1e-3, rtol=0)
        torch.testing.assert_close(results[k].z_0, base.z_0, atol=1e-2, rtol=0)


def test_flop_counts_are_positive_and_backward_adds():
    one = count_unet_flops(UNET_CONFIG, latent_size=8)
    assert 0 < one.forward < one.forward_backward
    assert one.backward == one.forward_backward - one.forward
    two = count_unet_flops(UNET_CONFIG, latent_size=8, batch_size=2)  # returned per image
    assert two.forward == pytest.approx(one.forward)
    assert count_unet_flops(UNET_CONFIG, latent_size=16).forward > one.forward  # grows with resolution
    assert inversion_calls(50, 500).forward == 150 and inversion_calls(50, 500, recompute_cond=True).forward == 200
    assert floor_flops(one, 50, 10) == pytest.approx(150 * one.forward + 500 * one.forward_backward)


@pytest.mark.slow
def test_benchmark_script_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("nti_benchmark_script", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = [
        "--model",
        "tiny",
        "--batch-sizes",
        "1,2",
        "--num-ddim-steps",
        "2",
        "--num-inner-steps",
        "1",
        "--images",
        "3",
        "--baseline-images",
        "2",
        "--early-stop",
        "on",
        "--fixed",
        "--out",
        str(tmp_path),
    ]
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["runs"]["on"]["engine"]
    assert [(r["method"], r["rows"]) for r in rows] == [(m, b) for b in (1, 2) for m in ("slots", "fixed batches")]
    for r in rows:
        assert r["equality"]["passed"] and r["s_per_image"] > 0
        assert r["calls"]["grad"] * r["rows"] >= 3 * r["inner_steps_per_image"]  # every inner step is a grad row
    assert report["runs"]["on"]["baseline_as_distributed_s"] > 0 and report["machine"]["threads"] >= 1
    md = (tmp_path / "bench.md").read_text()
    assert "| on | slots | 2 |" in md and "authors' code as distributed" in md


def test_sd15_builds_on_meta_with_sd15_flops():
    """The SD1.5 architecture from configs: FLOPs near the issue's 0.80 / 1.67 TFLOP at 512 px."""
    from nti_bench.sd15 import SD15_UNET_CONFIG, build_sd15_unet

    unet = build_sd15_unet("meta")
    assert 0.85e9 < sum(p.numel() for p in unet.parameters()) < 0.87e9
    flops = count_unet_flops(SD15_UNET_CONFIG)
    assert flops.forward == pytest.approx(0.803e12, rel=0.01)
    assert flops.forward_backward == pytest.approx(1.669e12, rel=0.01)


def test_sdxl_builds_on_meta_as_sdxl_base():
    """SDXL base's shapes from configs: parameter counts of each network and the family read off them."""
    from nti_bench.sdxl import build_sdxl_components
    from nti_lightning.models.family import family_from_configs

    parts = build_sdxl_components("meta")
    count = {k: sum(p.numel() for p in parts[k].parameters()) for k in ("unet", "text_encoder_2", "vae")}
    # bigG's 695 M less its 49,408-token embedding table: the vocabulary is sized to the benchmark tokenizer
    assert 2.56e9 < count["unet"] < 2.58e9 and 0.63e9 < count["text_encoder_2"] < 0.64e9
    assert 83e6 < count["vae"] < 84e6
    family = family_from_configs(
        dict(parts["unet"].config), dict(parts["vae"].config), dict(parts["scheduler"].config), 77,
        {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True},
    )  # fmt: skip
    assert (family.name, family.native_image_size, family.scaling_factor) == ("sdxl", 1024, 0.13025)


def test_build_bench_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown benchmark model"):
        build_bench_model("sd3")


def test_build_bench_model_loads_a_local_folder(model_dir, random_model):
    model = build_bench_model(str(model_dir))
    assert model.fingerprint == random_model.fingerprint  # the folder's weights, not the embedded tiny model's


def test_unet_step_script_times_each_variant(tmp_path):
    spec = importlib.util.spec_from_file_location("nti_step_script", ROOT / "scripts" / "bench_unet_step.py")
    step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step)
    argv = ["--model", "tiny", "--batch-sizes", "1,2", "--variants", "eager,channels_last,bf16"]
    argv += ["--iters", "1", "--warmup", "0", "--rounds", "2", "--out", str(tmp_path)]
    assert step.main(argv) == 0
    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert [(r["batch_size"], r["variant"]) for r in rows] == [
        (b, v) for b in (1, 2) for v in ("eager", "channels_last", "bf16")
    ]
    assert all(r["ms_per_step"] > 0 and len(r["rounds_ms"]) == 2 for r in rows)
    assert all(r["speedup_vs_eager"] == 1.0 for r in rows if r["variant"] == "eager")
    assert "| 2 | channels_last |" in (tmp_path / "step.md").read_text()
