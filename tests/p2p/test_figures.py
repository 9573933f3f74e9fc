"""``p2p.figures``: the labelled strip (tiles unchanged below a band of column labels), the attention figure."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from nti_lightning.p2p import edit
from nti_lightning.p2p.figures import STRIP_GAP, edit_strip, fit_lines, input_image, labelled_strip

from .helpers import DOG

LONG = "a very long target prompt about a small grey cat sitting next to an old mirror in a sunny room"


def tiles(n: int, side: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)) for _ in range(n)]


def band_of(strip: Image.Image, side: int) -> int:
    return strip.height - side


def test_strip_has_a_label_band_and_unchanged_tiles():
    images = tiles(3)
    strip = labelled_strip(images, ["source", "reconstruction", f"edit: {LONG}"])
    band = band_of(strip, 64)
    assert strip.width == 3 * 64 + 2 * STRIP_GAP and band > 10  # at least one line of text
    for k, im in enumerate(images):
        x = k * (64 + STRIP_GAP)
        assert strip.crop((x, band, x + 64, band + 64)).tobytes() == im.tobytes()  # pixel for pixel
        label = np.asarray(strip.crop((x, 0, x + 64, band)).convert("L"))
        assert (label < 128).any(), f"column {k} has no label"  # dark text on white
    gaps = np.asarray(strip.crop((64, band, 64 + STRIP_GAP, strip.height)))
    assert (gaps == 255).all()  # white gaps between the tiles


def test_long_labels_are_wrapped_and_shortened_to_the_column():
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = fit_lines(draw, f"edit: {LONG}", font, 64, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(draw.textlength(line, font=font) <= 64 for line in lines)
    assert " ".join(lines).replace("...", "") in f"edit: {LONG}"
    assert fit_lines(draw, "source", font, 64) == ["source"]
    word = fit_lines(draw, "reconstruction", font, 40)  # one word wider than the column: cut
    assert len(word) == 1 and word[0].endswith("...") and draw.textlength(word[0], font=font) <= 40
    short = labelled_strip(tiles(2), ["a", "b"])
    taller = labelled_strip(tiles(2), ["a", LONG])
    assert band_of(taller, 64) > band_of(short, 64)  # the band grows with the longest label


def test_strip_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="one height"):
        labelled_strip([*tiles(1), *tiles(1, side=32)], ["a", "b"])
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        labelled_strip(tiles(2), ["a"])


def test_edit_strip_is_source_reconstruction_edit(model, inv):
    result = edit(model, inv, DOG)
    source = input_image(model, inv)  # no source file recorded: the VAE decoding of the pivot
    assert source.size == result.images[0].size == (64, 64)
    strip = edit_strip(source, result)
    band = band_of(strip, 64)
    for k, im in enumerate([source, result.images[0], result.images[1]]):
        x = k * (64 + STRIP_GAP)
        assert strip.crop((x, band, x + 64, band + 64)).tobytes() == im.tobytes()
    assert (
        strip.tobytes()
        == labelled_strip([source, *result.images], ["source", "reconstruction", f"edit: {DOG}"]).tobytes()
    )
