"""Pictures of an edit: the labelled strip (source | reconstruction | edit) and the attention figure.

Drawn with PIL's default font, so they need nothing beyond Pillow. The strip's tiles are the images exactly
as given, pixel for pixel, below a band of column labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw, ImageFont

from nti_lightning.data.image import ImageError, prepare_image, tensor_to_image
from nti_lightning.engine.sampling import decode_latents
from nti_lightning.store.inversion import Inversion

if TYPE_CHECKING:
    from nti_lightning.p2p.edit import EditResult

ATTENTION_TILE = 128
"""Pixel size of one token's tile in the attention figure (the coarse map is upsampled bicubically)."""
STRIP_GAP = 4
"""White pixels between the strip's tiles."""
LABEL_LINES = 3
"""Most lines of a strip's column label; a longer label (a long target prompt) ends in "..."."""


def input_image(model, inversion: Inversion) -> Image.Image:
    """The inverted image: the source file recorded by ``nti invert`` (prepared as it was inverted) if it is
    still there, else the VAE decoding of the pivot z*_0 (what the inversion actually saw)."""
    source = (inversion.meta.get("image") or {}).get("source")
    size = inversion.meta.get("image_size") or inversion.z_T.shape[-1] * model.vae_scale_factor
    if source and Path(source).is_file():
        try:
            return tensor_to_image(prepare_image(source, int(size)))
        except ImageError:
            pass
    return tensor_to_image(decode_latents(model, inversion.pivot_z0[None].to(model.device))[0])


def edit_strip(source: Image.Image, result: EditResult, k: int = 1) -> Image.Image:
    """source | reconstruction | edit k, each column labelled (the edit with its target prompt)."""
    labels = ["source", "reconstruction", f"edit: {result.target_prompts[k - 1]}"]
    return labelled_strip([source, result.images[0], result.images[k]], labels)


# ---------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------


def labelled_strip(images: Sequence[Image.Image], labels: Sequence[str], gap: int = STRIP_GAP) -> Image.Image:
    """Images of one height side by side, ``gap`` white pixels apart, under a band of labels (each wrapped to
    its column's width, at most ``LABEL_LINES`` lines)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    heights = {im.height for im in images}
    if len(heights) != 1:
        raise ValueError(f"strip images must have one height, got {sorted(heights)}")
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [fit_lines(draw, _drawable(text, font), font, im.width) for im, text in zip(images, labels)]
    line_h = _line_height(font)
    band = max(len(lines) for lines in wrapped) * line_h + 4
    canvas = Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) - 1), band + heights.pop()), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, lines in zip(images, wrapped):
        for n, text in enumerate(lines):
            draw.text((x + 1, 2 + n * line_h), text, fill="black", font=font)
        canvas.paste(im.convert("RGB"), (x, band))
        x += im.width + gap
    return canvas


def fit_lines(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = LABEL_LINES) -> list[str]:
    """``text`` wrapped at spaces into lines at most ``width`` pixels wide; past ``max_lines`` it is cut and
    the last line ends in "..."."""
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(trial, font=font) <= width:
            lines[-1] = trial
        else:
            lines.append(word)
    cut = len(lines) > max_lines
    lines = lines[:max_lines] or [""]
    return [_clip(draw, line, font, width, force=cut and n == len(lines) - 1) for n, line in enumerate(lines)]


def _clip(draw, text: str, font, width: int, force: bool = False) -> str:
    """``text`` as is if it fits ``width`` pixels (and not ``force``), else shortened to fit with "..."."""
    if not force and draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "..."


def _line_height(font) -> int:
    return font.getbbox("Ag")[3] + 2  # bottom of the tallest glyphs


def _drawable(text: str, font) -> str:
    """Pillow's bitmap fallback font (no FreeType) draws Latin-1 only."""
    return text if isinstance(font, ImageFont.FreeTypeFont) else text.encode("latin-1", "replace").decode("latin-1")


def attention_figure(maps: torch.Tensor, labels: Sequence[Sequence[str]], tile: int = ATTENTION_TILE) -> Image.Image:
    """P2P Figure 4: one row per prompt, one tile per used token — its map (min–max normalised, upsampled)
    over its label.

    maps: (rows, mh, mw, L); labels: per row, one label per used token position (start … end).
    """
    font = ImageFont.load_default()
    text_h = 16
    cols = max(len(r) for r in labels)
    canvas = Image.new("RGB", (cols * (tile + 4), len(labels) * (tile + text_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row_labels in enumerate(labels):
        for j, label in enumerate(row_labels):
            m = maps[r, :, :, j].float()
            m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)  # min–max: flat maps of a small model show
            m = (255 * m).round().clamp(0, 255).to(torch.uint8).numpy()
            img = Image.fromarray(m, mode="L").resize((tile, tile), Image.Resampling.BICUBIC).convert("RGB")
            x, y = j * (tile + 4), r * (tile + text_h + 4)
            canvas.paste(img, (x, y))
            draw.text((x + 2, y + tile + 2), _drawable(label[:18], font), fill="black", font=font)
    return canvas
