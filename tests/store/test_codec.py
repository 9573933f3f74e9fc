"""The null-embedding codec (store/codec.py) on real ∅_t of the trained tiny model and on synthetic tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nti_lightning import invert
from nti_lightning.models.embedded import ASSETS_DIR
from nti_lightning.store.codec import (
    ESCAPE,
    CodecError,
    along_t,
    decode,
    encode,
    escape_pack,
    escape_unpack,
    undo_along_t,
    zigzag,
)
from nti_lightning.store.codec_names import CODECS, DEFAULT_CODEC, LOSSLESS_CODEC, RAW_CODEC, is_lossless

LOSSY_RELATIVE = {"bf16": 2.0**-8, "fp16": 2.0**-11}
"""Round to nearest: at most half a unit in the last place — bf16 keeps 8 significant bits, fp16 11 — plus
half fp16's smallest subnormal (2^-25) below its normal range."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nulls(tiny_model):
    """∅_t (10, 77, 32) of the trained tiny model, Algorithm 1 at T = 10 on a sample photo."""
    [inv] = invert(tiny_model, [str(ASSETS_DIR / "samples" / "cat.png")], ["a photo of a cat"], num_ddim_steps=10)
    return inv.null_embeddings


def special_bits() -> torch.Tensor:
    """(6, 64) float32 of every kind of bit pattern: random words (NaN payloads among them), ±0, ±inf, quiet
    and signalling NaNs with payloads, subnormals, the largest finite values."""
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=(6, 64), dtype=np.uint64).astype(np.uint32)
    specials = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x00000001]
    specials += [0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000]
    words[1, : len(specials)] = specials
    words[2, : len(specials)] = specials[::-1]
    words[3] = words[2]  # a row equal to the previous one: XOR and delta give zeros
    return torch.from_numpy(words.view(np.float32).copy())


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_round_trips_real_nulls(nulls, codec):
    data, info = encode(nulls, codec)
    back = decode(data, info)
    assert back.dtype == torch.float32 and back.shape == nulls.shape and info["shape"] == list(nulls.shape)
    if is_lossless(codec):
        assert torch.equal(back.view(torch.int32), nulls.view(torch.int32))
    else:  # the rounding to fp16/bf16 is the only loss
        dtype = torch.bfloat16 if codec.startswith("bf16") else torch.float16
        assert torch.equal(back, nulls.to(dtype).float())
        assert ((back - nulls).abs() <= LOSSY_RELATIVE[codec[:4]] * nulls.abs() + 2.0**-25).all()
    if codec != RAW_CODEC:
        assert len(data) < 4 * nulls.numel()


@pytest.mark.parametrize("codec", [c for c in CODECS if is_lossless(c)])
def test_exact_codecs_keep_every_bit_pattern(codec):
    x = special_bits()
    back = decode(*encode(x, codec))
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))


@pytest.mark.parametrize("codec", [c for c in CODECS if c.startswith("bf16")])
def test_bf16_codecs_round_to_nearest_on_synthetic_tensors(codec):
    x = torch.randn(7, 5, 3, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 3)
    back = decode(*encode(x, codec))
    assert torch.equal(back, x.to(torch.bfloat16).float())


def test_transforms_invert_and_zigzag_makes_small_differences_small():
    """Why the transforms are ours (numpy): XOR / integer delta of bit patterns along t, inverted exactly —
    modulo 2^bits — and zigzag so a step of −k units becomes 2k − 1 instead of 2^16 − k."""
    rng = np.random.default_rng(1)
    for dtype in (np.uint16, np.uint32):
        u = rng.integers(0, np.iinfo(dtype).max, size=(9, 4, 3), dtype=np.uint64).astype(dtype)
        for transform in ("xor", "delta", None):
            assert np.array_equal(undo_along_t(along_t(u, transform), transform), u)
    d = np.array([0, -1, 1, -2, 2, -32768, 32767], dtype=np.int16).view(np.uint16)
    assert zigzag(d).tolist() == [0, 1, 2, 3, 4, 65535, 65534]


def test_delta_along_t_is_what_makes_real_nulls_small(nulls):
    """∅_{t−1} starts from ∅_t (Algorithm 1, line 11): along t, bf16's differences are a few units."""
    size = {c: len(encode(nulls, c)[0]) for c in ("bf16-zstd", "bf16-xor-zstd", "bf16-delta-zstd")}
    assert size["bf16-delta-zstd"] < min(size["bf16-xor-zstd"], 0.85 * size["bf16-zstd"]), size
    assert len(encode(nulls, LOSSLESS_CODEC)[0]) < len(encode(nulls, "fp32-zstd")[0])
    assert DEFAULT_CODEC == "bf16-delta-zstd"


def test_escape_packing_inverts_and_beats_the_byte_shuffle_on_real_nulls(nulls):
    """Why the escape packing is ours: zstd codes bytes, and a byte shuffle of small 16-bit differences leaves a
    plane of mostly-zero high bytes that its entropy coder spends ≥ 1 bit each on; one byte per value with an
    escape to the full value reaches the values' own entropy (docs/storage.md)."""
    rng = np.random.default_rng(2)
    u = np.concatenate([rng.integers(0, 2**16, 50), rng.geometric(0.02, 500).clip(0, 2**16 - 1), [254, 255, 256, 0]])
    u = u.astype(np.uint16)
    packed = escape_pack(u)
    big = u >= ESCAPE
    assert packed.dtype == np.uint8 and len(packed) == len(u) + 2 * big.sum()
    assert (packed[: len(u)][big] == ESCAPE).all() and np.array_equal(packed[: len(u)][~big], u[~big])
    assert np.array_equal(escape_unpack(packed, len(u), u.dtype), u)
    with pytest.raises(CodecError, match="escapes"):
        escape_unpack(packed[:-1], len(u), u.dtype)
    for codec in ("bf16-delta-zstd", "bf16-xor-zstd", "fp16-delta-zstd", "fp16-xor-zstd"):
        escaped, info = encode(nulls, codec)
        shuffled, old = encode(nulls, codec, pack="shuffle")
        assert info["pack"] == "escape" and old["pack"] == "shuffle"
        assert torch.equal(decode(escaped, info), decode(shuffled, old))
        if codec.startswith("bf16"):  # smaller here; 7 % on SD1.5-shaped ∅_t (docs/storage.md)
            assert len(escaped) < len(shuffled), (codec, len(escaped), len(shuffled))
    assert encode(nulls, "fp32-delta-zstd")[1]["pack"] == "shuffle"  # fp32 differences are mostly ≥ 255


def test_corrupt_or_truncated_bytes_are_a_codec_error(nulls):
    data, info = encode(nulls, DEFAULT_CODEC)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    for bad in (data[: len(data) // 2], bytes(flipped), b""):
        with pytest.raises(CodecError):
            decode(bad, info)
    with pytest.raises(CodecError, match="shape"):
        decode(*encode(nulls[:3], DEFAULT_CODEC)[:1], {**info, "shape": [4, 77, 32]})
    with pytest.raises(CodecError, match="shape"):
        decode(encode(nulls, RAW_CODEC)[0][:-4], {**info, "codec": RAW_CODEC})


def test_bad_codec_input_is_a_clear_error(nulls):
    with pytest.raises(ValueError, match="unknown null-embedding codec 'zip'.*bf16-delta-zstd"):
        encode(nulls, "zip")
    with pytest.raises(TypeError, match="float32"):
        encode(nulls.double(), DEFAULT_CODEC)
    with pytest.raises(ValueError, match="beyond fp16's range.*bf16"):
        encode(nulls * 1e5, "fp16-delta-zstd")
    assert torch.equal(decode(*encode(nulls * 1e5, "bf16-delta-zstd")), (nulls * 1e5).to(torch.bfloat16).float())
