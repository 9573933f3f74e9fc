"""A storage codec for the null embeddings ∅_t: a (T, …) float32 tensor, compressed along t.

∅_{t−1} starts from ∅_t (Algorithm 1, line 11, Mokady et al. 2023) and moves by a few Adam steps — one once
early stopping fires — so consecutive rows differ in a few units in the last place of the stored format.
A codec named ``"{dtype}-{transform}-zstd"`` stores ∅_t as:

1. ``dtype``: "fp32" (exact), "fp16" or "bf16" (round to nearest even; the only lossy step);
2. the bit patterns as unsigned integers, then ``transform`` along t (axis 0): "xor" (row ^ previous row),
   "delta" (row − previous row as signed integers, zigzag-mapped so ±k units become 2k / 2k − 1) or none
   (``"{dtype}-zstd"``); the first row is kept as it is;
3. packed into bytes (``info["pack"]``): 2-byte values after a transform by escape (``escape_pack``: one byte
   each, 255 standing for "in full after the bytes"), all others by byte shuffle (all first bytes, then all
   second bytes, …);
4. zstd (the ``zstandard`` library) with a content checksum.

"fp32" is no codec at all: the raw little-endian float32, as records were written before codecs existed.
Steps 2 and 3 are written in numpy: no library offers XOR or integer delta of float bit patterns along one
axis (numcodecs' Delta subtracts in the float dtype over the flattened array, which does not invert exactly),
a byte shuffle is one reshape, and the escape packing is what brings zstd's byte-wise entropy coder to the
16-bit values' own entropy (a byte shuffle leaves zstd ~7 % above it on SD1.5-shaped ∅_t; docs/storage.md).
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
ESCAPE = 255
"""The byte of ``escape_pack`` that stands for a value stored in full: 0–254 are themselves."""
PACKS = ("shuffle", "escape")


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


def zigzag(d: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Signed differences (as unsigned) → 0, −1, 1, −2, … ↦ 0, 1, 2, 3, …: small either way (into ``out``,
    which may be ``d``)."""
    s = d.view(_INT_OF[d.dtype.itemsize])
    sign = s >> (8 * d.itemsize - 1)  # 0 or −1
    z = np.left_shift(s, 1, out=None if out is None else out.view(s.dtype))
    return np.bitwise_xor(z, sign, out=z).view(d.dtype)


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
        zigzag(out[1:], out=out[1:])
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


def escape_pack(u: np.ndarray) -> np.ndarray:
    """(n,) uint16 → (n + 2m,) bytes: each value as one byte, ``ESCAPE`` for the m values ≥ 255, then those m
    values in full, byte-shuffled. Zigzag differences of ∅_t are mostly below 255, so the first byte's symbol
    carries "small value" and "escape" jointly, and zstd's byte-wise entropy coder codes the whole at about the
    values' own entropy — a byte shuffle spends ≥ 1 bit on every high byte, ~90 % of them zero."""
    big = np.flatnonzero(u >= ESCAPE)  # (m,)
    head = u.astype(np.uint8)
    head[big] = ESCAPE
    return np.concatenate([head, shuffle_bytes(u[big]).reshape(-1)])


def escape_unpack(b: np.ndarray, n: int, dtype: np.dtype) -> np.ndarray:
    """The inverse of ``escape_pack``: (n + 2m,) bytes → (n,) uint16; ``CodecError`` if the length is not
    n + 2m for the m escapes of the first n bytes."""
    head = b[:n]
    big = np.flatnonzero(head == ESCAPE)
    if len(b) != n + dtype.itemsize * len(big):
        raise CodecError(f"escape-packed data holds {len(b)} bytes, not the {n + dtype.itemsize * len(big)} "
                         f"of {n} values with {len(big)} escapes")  # fmt: skip
    u = head.astype(dtype)
    u[big] = unshuffle_bytes(b[n:], dtype)
    return u


def pack_of(dtype: str, transform: str | None) -> str:
    """How ``encode`` packs a codec's values into bytes: escape for 2-byte values after a transform along t
    (small), byte shuffle otherwise (fp32's differences and raw bit patterns are mostly ≥ 255)."""
    return "escape" if transform is not None and _UINT[dtype].itemsize == 2 else "shuffle"


# ---------------------------------------------------------------------------------------------------------
# Encode / decode
# ---------------------------------------------------------------------------------------------------------


def encode(
    x: torch.Tensor, codec: str, level: int = ZSTD_LEVEL, pack: str | None = None
) -> tuple[bytes, dict[str, Any]]:
    """A float32 (T, …) tensor → (bytes, info); ``decode(bytes, info)`` gives it back (exactly for the fp32
    codecs, rounded to fp16/bf16 for the others). ``info`` is JSON: codec, shape, packing, zstd level.
    ``pack`` (``PACKS``) overrides ``pack_of``'s choice, for measuring one against the other."""
    dtype, transform = parse_codec(codec)
    if x.dtype != torch.float32:
        raise TypeError(f"the null-embedding codec takes float32 tensors, got {x.dtype}")
    x = x.detach().cpu().contiguous()
    info = {"codec": codec, "shape": list(x.shape)}
    if codec == RAW_CODEC:
        return x.numpy().astype("<f4", copy=False).tobytes(), info
    pack = pack or pack_of(dtype, transform)
    if pack not in PACKS:
        raise ValueError(f"unknown packing {pack!r}; the packings are {', '.join(PACKS)}")
    values = along_t(to_bits(x, dtype), transform).reshape(-1)  # (numel,)
    packed = escape_pack(values) if pack == "escape" else shuffle_bytes(values)
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return compressor.compress(packed), {**info, "pack": pack, "zstd_level": level}


def decode(data: bytes, info: dict[str, Any]) -> torch.Tensor:
    """(bytes, info) from ``encode`` → the float32 tensor of ``info["shape"]``; ``CodecError`` if the bytes are
    corrupt or truncated. Records without ``info["pack"]`` (format ≤ 3) are byte-shuffled."""
    codec, shape = info["codec"], tuple(info["shape"])
    dtype, transform = parse_codec(codec)
    pack = info.get("pack", "shuffle")
    if pack not in PACKS:
        raise CodecError(f"{codec} data is packed as {pack!r}, which this version does not read; upgrade nti_lightning")
    numel = int(np.prod(shape, dtype=np.int64))
    uint = _UINT[dtype]
    if codec == RAW_CODEC:
        raw = bytes(data)
    else:
        try:
            most = numel * (uint.itemsize + (pack == "escape"))  # escape: a byte each + the escaped in full
            raw = zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=most)
        except zstandard.ZstdError as e:
            raise CodecError(f"{codec} data does not decompress ({e})") from e
    if pack == "escape":
        try:
            bits = escape_unpack(np.frombuffer(raw, np.uint8), numel, uint).reshape(shape)
        except CodecError as e:
            raise CodecError(f"{codec} data of shape {shape}: {e}") from None
        return from_bits(undo_along_t(bits, transform), dtype)
    if len(raw) != numel * uint.itemsize:
        raise CodecError(f"{codec} data holds {len(raw)} bytes, not the {numel * uint.itemsize} of shape {shape}")
    if codec == RAW_CODEC:
        return torch.from_numpy(np.frombuffer(raw, "<f4").astype(np.float32)).reshape(shape)
    bits = unshuffle_bytes(np.frombuffer(raw, np.uint8), uint).reshape(shape)
    return from_bits(undo_along_t(bits, transform), dtype)
