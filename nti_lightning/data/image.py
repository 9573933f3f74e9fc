"""Reading and preparing input images, with errors that name the file and the fix.

Preparation follows the authors' ``load_512``: centre crop to a square, resize (Pillow bicubic) to the
model's size, then x / 127.5 − 1 → [-1, 1].
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE = 32
"""Smaller images are refused: upscaling a few pixels to 512 is not a reconstruction of anything."""
MAX_PIXELS = 40_000**2
"""Larger images are refused before decoding (Pillow's decompression-bomb guard, stated plainly)."""


class ImageError(ValueError):
    """An input image that cannot be inverted; the message names the file and what to do."""


def load_image(src: str | Path | bytes | Image.Image | np.ndarray, name: str | None = None) -> Image.Image:
    """Any supported input → 8-bit RGB PIL image. Raises ``ImageError`` with the file name and a fix.

    ``bytes`` are an encoded image held in memory (a member of a tar shard, a Parquet cell), checked and
    decoded exactly like a file; ``name`` then says where they came from (``SHARD:KEY``)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(src), name or "image bytes")
    label = name or (str(src) if isinstance(src, (str, Path)) else type(src).__name__)
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, label)
    if isinstance(src, Image.Image):
        return _to_rgb(src, label)
    path = Path(src)
    if not path.is_file():
        raise ImageError(f"{label}: file not found")
    return _decode(path, label)


def _decode(fp: Path | io.BytesIO, label: str) -> Image.Image:
    """Opens, checks and decodes an encoded image (a path or an in-memory file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{label}: {w}×{h} pixels is too large to decode safely; downscale it first")
                if img.format == "JPEG":  # decode at reduced scale: we only need the model's size
                    img.draft("RGB", (max(w // 8, 512), max(h // 8, 512)))
                img.load()
                return _to_rgb(img, label)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image Pillow can read; remove it or convert it to PNG/JPEG") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{label}: image is too large to decode safely; downscale it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{label}: unreadable or truncated image ({e}); re-export or remove the file") from None


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    img = ImageOps.exif_transpose(img) if hasattr(img, "getexif") else img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(img), label)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)  # transparent pixels become white, not hidden colour
    rgb = img.convert("RGB")
    _check_size(rgb, label)
    return rgb


def _array_to_rgb(arr: np.ndarray, label: str) -> Image.Image:
    """uint8/uint16/float arrays, (H, W), (H, W, 1|3|4) → RGB; 16-bit and float are rescaled, not clipped."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # (C, H, W) → (H, W, C)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ImageError(f"{label}: array of shape {arr.shape} is not an image (expected H×W, H×W×3 or H×W×4)")
    if a.dtype == np.uint8:
        u8 = a
    elif np.issubdtype(a.dtype, np.integer):
        top = 65535 if a.max(initial=0) > 255 else 255
        u8 = np.clip(np.round(a.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    else:
        if not np.isfinite(a).all():
            raise ImageError(f"{label}: image array contains NaN or inf")
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        u8 = np.clip(np.round(a.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    if u8.shape[-1] == 1:
        u8 = np.repeat(u8, 3, axis=-1)
    mode = "RGBA" if u8.shape[-1] == 4 else "RGB"
    return _to_rgb(Image.fromarray(u8, mode=mode), label)


def _check_size(img: Image.Image, label: str) -> None:
    if min(img.size) < MIN_SIDE:
        raise ImageError(
            f"{label}: {img.size[0]}×{img.size[1]} pixels is too small (shorter side < {MIN_SIDE}); use a larger image"
        )


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to the largest square, then resize to size×size with Pillow's bicubic filter."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL → (3, H, W) float32 in [-1, 1] (x / 127.5 − 1)."""
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → RGB PIL, rounding like diffusers' image processor."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def prepare_image(src, size: int, name: str | None = None) -> torch.Tensor:
    """Load + centre crop + resize + normalise: any supported input (a path, encoded ``bytes``, a PIL image,
    an array) → (3, size, size) in [-1, 1]."""
    return image_to_tensor(center_crop_resize(load_image(src, name), size))
