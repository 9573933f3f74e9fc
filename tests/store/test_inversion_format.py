"""The inversion record with ∅_t through a codec and z_T once (format 4; format 3 byte-shuffled, format 2 also
without z_T once), files from before codecs (format 1), the in-memory form, and damaged files; on the trained tiny
models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save_file

from nti_lightning import invert, load_inversion, load_model, save_inversion
from nti_lightning.api import reconstruction_latents
from nti_lightning.cli import main
from nti_lightning.config import ConfigError, OutputConfig, load_config
from nti_lightning.engine.sampling import decode_latents
from nti_lightning.metrics import image_metrics
from nti_lightning.models.embedded import ASSETS_DIR
from nti_lightning.store.codec_names import CODECS, DEFAULT_CODEC, LOSSLESS_CODEC, RAW_CODEC, ZSTD_LEVEL, is_lossless
from nti_lightning.store.inversion import FORMAT_VERSION, TENSOR_FIELDS, inversion_from_bytes, inversion_to_bytes

CAT = str(ASSETS_DIR / "samples" / "cat.png")
PROMPT = "a photo of a cat"
FORMAT1 = Path(__file__).parent / "data" / "format1_tiny_T3.safetensors"
"""Written by ``save_inversion`` before codecs existed (commit 3ef4483): tiny, cat.png, T = 3, N = 2."""
FORMAT3 = Path(__file__).parent / "data" / "format3_tiny_T3.safetensors"
"""``FORMAT1``'s inversion written by ``save_inversion`` with the default codec at commit 128f4ad (format 3: ∅_t
byte-shuffled, no "pack" in its codec info)."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cat(tiny_model):
    """Algorithm 1 at T = 10 (N = 10, w = 7.5) on a sample photo."""
    return invert(tiny_model, [CAT], [PROMPT], num_ddim_steps=10)[0]


def psnr_vs_vae(model, inv) -> float:
    vae = decode_latents(model, inv.pivot_z0[None])[0]
    return image_metrics(decode_latents(model, reconstruction_latents(model, [inv]))[0], vae)["psnr"]


def record_of(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["nti_lightning"])


def test_a_format1_file_from_before_codecs_loads_and_codec_fp32_writes_it_again(tiny_model, tmp_path):
    inv = load_inversion(FORMAT1, tiny_model)
    assert record_of(FORMAT1)["format_version"] == 1 and inv.null_embeddings.shape == (3, 77, 32)
    assert inv.meta["image"]["id"] == "cat" and inv.null_embeddings.dtype == torch.float32
    assert inversion_to_bytes(inv, RAW_CODEC) == FORMAT1.read_bytes()  # byte for byte the old layout
    assert save_inversion(tmp_path / "again", inv, codec=RAW_CODEC).read_bytes() == FORMAT1.read_bytes()
    exact = inversion_from_bytes(inversion_to_bytes(inv, LOSSLESS_CODEC))
    assert torch.equal(reconstruction_latents(tiny_model, [exact]), reconstruction_latents(tiny_model, [inv]))


def test_a_format3_file_reads_to_the_same_nulls_as_format4_gives(tiny_model):
    """Format 3 packed every field by byte shuffle; format 4 escape-packs bf16 differences. Both hold ∅_t rounded
    to bf16, so the old file decodes to exactly what a new record of the same inversion decodes to."""
    exact = load_inversion(FORMAT1, tiny_model)
    old = load_inversion(FORMAT3, tiny_model)
    assert record_of(FORMAT3)["format_version"] == 3 and "pack" not in record_of(FORMAT3)["codecs"]["null_embeddings"]
    new = inversion_from_bytes(inversion_to_bytes(exact))
    assert torch.equal(old.null_embeddings, exact.null_embeddings.to(torch.bfloat16).float())
    assert torch.equal(old.null_embeddings, new.null_embeddings) and torch.equal(old.z_T, exact.z_T)


def test_format4_holds_the_nulls_encoded_z_T_once_and_everything_else_as_it_was(cat, tmp_path):
    path = save_inversion(tmp_path / "cat", cat)  # the default codec
    record, tensors = record_of(path), load(path.read_bytes())
    assert record["format_version"] == FORMAT_VERSION == 4 and record["prompt"] == PROMPT and record["meta"] == cat.meta
    assert record["same"] == {"pivot_zT": "z_T"} and "pivot_zT" not in tensors  # z̄_T = z*_T: stored once
    tensors["pivot_zT"] = tensors["z_T"]
    assert record["codecs"] == {
        "null_embeddings": {"codec": DEFAULT_CODEC, "shape": [10, 77, 32], "pack": "escape", "zstd_level": ZSTD_LEVEL}
    }
    assert tensors["null_embeddings"].dtype == torch.uint8 and tensors["null_embeddings"].dim() == 1
    for name in TENSOR_FIELDS[2:] + ("z_T",):  # z_T, the pivots, timesteps, inner steps, final loss: exact
        assert torch.equal(tensors[name], getattr(cat, name)) and tensors[name].dtype == getattr(cat, name).dtype
    assert path.read_bytes() == inversion_to_bytes(cat) and not list(tmp_path.glob("*.tmp"))
    back = load_inversion(path)
    assert torch.equal(back.pivot_zT, cat.pivot_zT) and torch.equal(back.z_T, cat.z_T)


def test_a_pivot_end_other_than_z_T_is_kept_and_format2_files_still_read(cat, tmp_path):
    moved = replace(cat, pivot_zT=cat.pivot_zT + 1.0)
    data = inversion_to_bytes(moved)
    record = json.loads(_metadata(data))
    assert record["same"] == {}
    assert torch.equal(inversion_from_bytes(data).pivot_zT, moved.pivot_zT)
    # a format-2 file (before "same"): every latent stored, no "same" key
    tensors = load(inversion_to_bytes(cat))
    tensors["pivot_zT"] = cat.pivot_zT.clone()
    old = {k: v for k, v in json.loads(_metadata(inversion_to_bytes(cat))).items() if k != "same"}
    save_file(
        tensors, str(tmp_path / "v2.safetensors"), metadata={"nti_lightning": json.dumps({**old, "format_version": 2})}
    )
    back = load_inversion(tmp_path / "v2.safetensors")
    assert torch.equal(back.pivot_zT, cat.pivot_zT) and torch.equal(
        back.null_embeddings, inversion_from_bytes(inversion_to_bytes(cat)).null_embeddings
    )


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_round_trips_through_bytes_and_files(cat, codec, tmp_path):
    data = inversion_to_bytes(cat, codec)
    back = inversion_from_bytes(data, label="mem")
    if is_lossless(codec):
        assert torch.equal(back.null_embeddings, cat.null_embeddings)
    else:
        dtype = torch.bfloat16 if codec.startswith("bf16") else torch.float16
        assert torch.equal(back.null_embeddings, cat.null_embeddings.to(dtype).float())
    for name in TENSOR_FIELDS[:1] + TENSOR_FIELDS[2:]:
        assert torch.equal(getattr(back, name), getattr(cat, name)), name
    assert back.prompt == cat.prompt and back.meta == cat.meta and back.null_extra == {}
    assert load_inversion(save_inversion(tmp_path / "x", cat, codec=codec)).prompt == PROMPT
    assert (tmp_path / "x.safetensors").read_bytes() == data


def test_a_reconstruction_from_a_default_codec_record_is_within_0_1_db(tiny_model, cat):
    decoded = inversion_from_bytes(inversion_to_bytes(cat, DEFAULT_CODEC))
    assert not torch.equal(decoded.null_embeddings, cat.null_embeddings)  # lossy indeed
    assert abs(psnr_vs_vae(tiny_model, decoded) - psnr_vs_vae(tiny_model, cat)) <= 0.1


def test_the_default_codec_is_4x_smaller_at_the_default_settings(tiny_model):
    """docs/storage.md's claim, on one photo at T = 50: ≥ 4× smaller than the fp32 file, ≤ 0.1 dB of NTI
    reconstruction PSNR against the VAE round trip lost."""
    inv = invert(tiny_model, [CAT], [PROMPT])[0]
    decoded = inversion_from_bytes(inversion_to_bytes(inv, DEFAULT_CODEC))
    ratio = len(inversion_to_bytes(inv, RAW_CODEC)) / len(inversion_to_bytes(inv, DEFAULT_CODEC))
    assert ratio >= 4 and abs(psnr_vs_vae(tiny_model, decoded) - psnr_vs_vae(tiny_model, inv)) <= 0.1, ratio


def test_fixed_nulls_and_the_optional_fields_stay_exact(tiny_model):
    """ddim/direct record ψ("") at every step, proxnpi ψ(P): the default codec keeps them bit for bit (one row
    after the delta), and the trajectory and corrections go through the exact codec."""
    fast = dict(num_ddim_steps=3)
    for method, field in (("ddim", None), ("direct", "corrections"), ("proxnpi", "trajectory")):
        inv = invert(tiny_model, [CAT], [PROMPT], method=method, **fast)[0]
        data = inversion_to_bytes(inv)
        back, codecs = inversion_from_bytes(data), json.loads(_metadata(data))["codecs"]
        assert (
            torch.equal(back.null_embeddings, inv.null_embeddings)
            and codecs["null_embeddings"]["codec"] == LOSSLESS_CODEC
        )
        if field:
            assert torch.equal(getattr(back, field), getattr(inv, field)) and codecs[field]["codec"] == LOSSLESS_CODEC
            assert torch.equal(reconstruction_latents(tiny_model, [back]), reconstruction_latents(tiny_model, [inv]))
    with pytest.raises(ValueError, match="unknown null-embedding codec 'zip'"):
        inversion_to_bytes(inv, "zip")


def _metadata(data: bytes) -> str:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])["__metadata__"]["nti_lightning"]


def test_sdxl_pooled_null_goes_through_the_codec_and_time_ids_stay_exact():
    sdxl = load_model("tiny-sdxl")
    keys = ["prompt_embeds", "text_embeds", "time_ids"]
    inv = invert(sdxl, [CAT], [PROMPT], num_ddim_steps=3, num_inner_steps=2, image_size=64, optimize=keys)[0]
    data = inversion_to_bytes(inv)
    back, codecs = inversion_from_bytes(data), json.loads(_metadata(data))["codecs"]
    assert set(codecs) == {"null_embeddings", "null_embeddings.text_embeds"}
    pooled = inv.null_extra["text_embeds"]
    assert torch.equal(back.null_extra["text_embeds"], pooled.to(torch.bfloat16).float())
    assert torch.equal(back.null_extra["time_ids"], inv.null_extra["time_ids"])


def test_a_damaged_file_is_a_one_line_error_naming_it(cat, tmp_path):
    path = save_inversion(tmp_path / "cat", cat)
    header = {"nti_lightning": json.dumps(record_of(path))}
    tensors = load(path.read_bytes())
    encoded = tensors["null_embeddings"]
    flipped = encoded.clone()
    flipped[len(flipped) // 2] ^= 1
    for bad in (encoded[: len(encoded) // 2].clone(), flipped):
        save_file({**tensors, "null_embeddings": bad}, str(path), metadata=header)
        with pytest.raises(ValueError, match=r"cat\.safetensors: field 'null_embeddings' .* is corrupt") as e:
            load_inversion(path)
        assert "\n" not in str(e.value) and "invert the image again" in str(e.value)
    full = inversion_to_bytes(cat)
    for cut in (full[: len(full) // 2], full[:6]):
        path.write_bytes(cut)
        with pytest.raises(ValueError, match=r"cat\.safetensors") as e:
            load_inversion(path)
        assert "\n" not in str(e.value)
    later = json.loads(_metadata(full))
    save_file(tensors, str(path), metadata={"nti_lightning": json.dumps({**later, "format_version": 5})})
    with pytest.raises(ValueError, match="format version 5.*upgrade"):
        load_inversion(path)


def test_output_codec_is_validated_and_the_run_writes_with_it(tmp_path):
    assert OutputConfig().codec == DEFAULT_CODEC
    with pytest.raises((ValueError, ConfigError), match="output.codec must be one of"):
        load_config(None, ["output.codec=zip"])
    out = tmp_path / "out"
    argv = ["invert", "--images", CAT, "--output", str(out), "--quiet", "data.default_prompt=a photo of a cat"]
    argv += ["inversion.num_ddim_steps=2", "inversion.num_inner_steps=1", "inversion.image_size=64"]
    argv += ["output.codec=fp32-xor-zstd", "output.save_strip=false", "output.compute_baseline=false"]
    assert main([*argv, "output.logger=none"]) == 0
    [path] = out.rglob("inversion.safetensors")
    assert record_of(path)["codecs"]["null_embeddings"]["codec"] == "fp32-xor-zstd"
