"""A storage codec for the null embeddings ∅_t: a (T, …) float32 tensor, compressed along t.

∅_{t−1} starts from ∅_t (Algorithm 1, line 11, Mokady et al. 2023) and moves by a few Adam steps — one once
early stopping fires — so consecutive rows differ in a few units in the last place of the stored format.
A codec named ``"{dtype}-{transform}-zstd"`` stores ∅_t as:

1. ``dtype``: "fp32" (exact), "fp16" or "bf16" (round to nearest even; the only lossy step);
2. the bit patterns as unsigned integers, then ``transform`` along t (axis 0): "xor" (row ^ previous row),
   "delta" (row − previous row as signed integers, zigzag-mapped so ±k units become 2k / 2k − 1) or none
   (``"{dtype}-zstd"``); the first row is kept as it is;
3. the bytes grouped by significance (byte shuffle: all first bytes, then all second bytes, …);
4. zstd (the ``zstandard`` library) with a content checksum.

"fp32" is no codec at all: the raw little-endian float32, as records were written before codecs existed.
Steps 2 and 3 are written in numpy: no library offers XOR or integer delta of float bit patterns along one
axis (numcodecs' Delta subtracts in the float dtype over the flattened array, which does not invert exactly),
and a byte shuffle is one reshape.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import zstandard

from nti_lightning.store.codec_names import RAW_CODEC, ZSTD_LEVEL, parse_codec

_UINT = {"fp32": np.dtype("<u4"), "fp16": np.dtype("<u2"), "bf16": np.dtype("<u2")}
_INT_OF = {2: np.dtype("<i2"), 4: np.dtype("<i4")}  # by byte width
_FP16_MAX = 65504.0


class CodecError(ValueError):
    """Encoded bytes that do not decode to the tensor their info describes (corrupt or truncated)."""


# ---------------------------------------------------------------------------------------------------------
# The transforms (numpy, pure)
# ---------------------------------------------------------------------------------------------------------


def to_bits(x: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 (T, …) → its bit patterns in ``dtype`` as little-endian unsigned integers (T, …)."""
    if dtype == "bf16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(_UINT[dtype])
    if dtype == "fp16":
        finite = x[x.isfinite()]
        big = finite.abs().max().item() if finite.numel() else 0.0
        if big > _FP16_MAX:
            raise ValueError(f"|∅_t| reaches {big:.4g}, beyond fp16's range ({_FP16_MAX}); use a bf16 or fp32 codec")
        return x.numpy().astype(np.float16).view(_UINT[dtype])
    return x.numpy().view(_UINT[dtype])


def from_bits(bits: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of ``to_bits``: → float32 (T, …)."""
    if dtype == "bf16":
        return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float()
    if dtype == "fp16":
        return torch.from_numpy(bits.view(np.float16).astype(np.float32))
    return torch.from_numpy(bits.view(np.float32).copy())


def zigzag(d: np.ndarray) -> np.ndarray:
    """Signed differences (as unsigned) → 0, −1, 1, −2, … ↦ 0, 1, 2, 3, …: small either way."""
    s = d.view(_INT_OF[d.dtype.itemsize])
    return ((s << 1) ^ (s >> (8 * d.itemsize - 1))).view(d.dtype)


def unzigzag(z: np.ndarray) -> np.ndarray:
    """The inverse of ``zigzag``."""
    return (z >> 1) ^ (np.zeros_like(z) - (z & 1))


def along_t(u: np.ndarray, transform: str | None) -> np.ndarray:
    """(T, …) unsigned → the first row, then each row XOR / zigzag-delta the previous one (wrapping)."""
    if transform is None or len(u) < 2:
        return u
    out = np.empty_like(u)
    out[0] = u[0]
    if transform == "xor":
        np.bitwise_xor(u[1:], u[:-1], out=out[1:])
    else:
        np.subtract(u[1:], u[:-1], out=out[1:])
        out[1:] = zigzag(out[1:])
    return out


def undo_along_t(v: np.ndarray, transform: str | None) -> np.ndarray:
    """The inverse of ``along_t``: running XOR / sum along t."""
    if transform is None or len(v) < 2:
        return v
    if transform == "xor":
        return np.bitwise_xor.accumulate(v, axis=0)
    d = np.concatenate([v[:1], unzigzag(v[1:])])
    return np.cumsum(d, axis=0, dtype=v.dtype)  # modulo 2^bits, as the differences were taken


def shuffle_bytes(u: np.ndarray) -> np.ndarray:
    """(n,) k-byte integers → (k, n) bytes, C-contiguous: byte j of every value together."""
    return np.ascontiguousarray(u.reshape(-1).view(np.uint8).reshape(-1, u.itemsize).T)


def unshuffle_bytes(b: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The inverse of ``shuffle_bytes``: (k·n,) bytes → (n,) integers of ``dtype``."""
    return np.ascontiguousarray(b.reshape(dtype.itemsize, -1).T).view(dtype).reshape(-1)


# ---------------------------------------------------------------------------------------------------------
# Encode / decode
# ---------------------------------------------------------------------------------------------------------


def encode(x: torch.Tensor, codec: str, level: int = ZSTD_LEVEL) -> tuple[bytes, dict[str, Any]]:
    """A float32 (T, …) tensor → (bytes, info); ``decode(bytes, info)`` gives it back (exactly for the fp32
    codecs, rounded to fp16/bf16 for the others). ``info`` is JSON: codec, shape, zstd level."""
    dtype, transform = parse_codec(codec)
    if x.dtype != torch.float32:
        raise TypeError(f"the null-embedding codec takes float32 tensors, got {x.dtype}")
    x = x.detach().cpu().contiguous()
    info = {"codec": codec, "shape": list(x.shape)}
    if codec == RAW_CODEC:
        return x.numpy().astype("<f4", copy=False).tobytes(), info
    planes = shuffle_bytes(along_t(to_bits(x, dtype), transform))  # (bytes per value, numel)
    return compressor(level, planes.nbytes).compress(planes), {**info, "zstd_level": level}


def compressor(level: int, size: int) -> zstandard.ZstdCompressor:
    """zstd at ``level`` for ``size`` bytes, with a content checksum; levels 1–2 with the double-fast match
    finder (level 3's), which on byte-shuffled ∅_t is ~1 % smaller at level 1's speed (docs/storage.md)."""
    params = {"strategy": zstandard.STRATEGY_DFAST} if 0 < level < 3 else {}
    return zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(
            level, source_size=size, write_checksum=True, write_content_size=True, **params
        )
    )


def decode(data: bytes, info: dict[str, Any]) -> torch.Tensor:
    """(bytes, info) from ``encode`` → the float32 tensor of ``info["shape"]``; ``CodecError`` if the bytes are
    corrupt or truncated."""
    codec, shape = info["codec"], tuple(info["shape"])
    dtype, transform = parse_codec(codec)
    numel = int(np.prod(shape, dtype=np.int64))
    uint = _UINT[dtype]
    if codec == RAW_CODEC:
        raw = bytes(data)
    else:
        try:
            raw = zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=numel * uint.itemsize)
        except zstandard.ZstdError as e:
            raise CodecError(f"{codec} data does not decompress ({e})") from e
    if len(raw) != numel * uint.itemsize:
        raise CodecError(f"{codec} data holds {len(raw)} bytes, not the {numel * uint.itemsize} of shape {shape}")
    if codec == RAW_CODEC:
        return torch.from_numpy(np.frombuffer(raw, "<f4").astype(np.float32)).reshape(shape)
    bits = unshuffle_bytes(np.frombuffer(raw, np.uint8), uint).reshape(shape)
    return from_bits(undo_along_t(bits, transform), dtype)
