"""The null-embedding codecs by name (a light module: the config checks ``output.codec`` without torch).

``codec.py`` implements them; docs/storage.md has their measured sizes and reconstruction loss."""

from __future__ import annotations

DTYPES = ("fp32", "fp16", "bf16")
"""What ∅_t is stored as: fp32 exact; fp16 and bf16 rounded to nearest even (the only lossy step)."""
TRANSFORMS = (None, "xor", "delta")
"""Along t: none, XOR with the previous row's bit pattern, or the zigzag-mapped integer difference from it."""
RAW_CODEC = "fp32"
"""No codec: the float32 tensor as it is (the format-1 record layout, as written before codecs)."""
CODECS = (RAW_CODEC, *(f"{d}-{t}-zstd" if t else f"{d}-zstd" for d in DTYPES for t in TRANSFORMS))
LOSSLESS_CODEC = "fp32-delta-zstd"
"""The smallest exact codec: bit for bit (NaN payloads, ±inf and −0.0 included)."""
DEFAULT_CODEC = "bf16-delta-zstd"
"""The codec ``save_inversion`` and ``output.codec`` default to: the smallest at ≤ 0.1 dB loss of NTI
reconstruction PSNR against the VAE round trip on the three tiny models (docs/storage.md)."""
ZSTD_LEVEL = 1
"""zstd compression level of every codec (``output.codec_level``; decoding does not depend on it), measured by
``scripts/codec_benchmark.py`` (docs/storage.md): level 1 encodes an SD1.5 record's ∅_t in ~10 ms on one core;
10 is 0.6–5 % smaller at 6–10× the time, 19 4–11 % at 40–75×."""


def parse_codec(codec: str) -> tuple[str, str | None]:
    """A codec name → (dtype, transform); a clear error for a name that is none."""
    if codec not in CODECS:
        raise ValueError(f"unknown null-embedding codec {codec!r}; the codecs are {', '.join(CODECS)}")
    parts = codec.split("-")
    return parts[0], (parts[1] if len(parts) == 3 else None)


def is_lossless(codec: str) -> bool:
    """Whether ``codec`` decodes bit for bit (the fp32 ones)."""
    return parse_codec(codec)[0] == "fp32"
