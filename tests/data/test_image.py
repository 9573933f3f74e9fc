import numpy as np
import pytest
import torch
from PIL import Image

from nti_lightning.data.image import ImageError, center_crop_resize, image_to_tensor, load_image, prepare_image


def _save(img, path):
    img.save(path)
    return path


def test_modes_become_rgb(tmp_path):
    gray = _save(Image.new("L", (64, 48), 100), tmp_path / "g.png")
    assert load_image(gray).mode == "RGB" and load_image(gray).getpixel((0, 0)) == (100, 100, 100)
    cmyk = _save(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), tmp_path / "c.jpg")
    r, g, b = load_image(cmyk).getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # red survives the conversion


def test_rgba_transparency_becomes_white_not_hidden_colour(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    assert load_image(_save(rgba, tmp_path / "a.png")).getpixel((3, 3)) == (255, 255, 255)


def test_16_bit_is_rescaled_not_clipped(tmp_path):
    arr = np.full((40, 40), 32768, dtype=np.uint16)
    img16 = Image.fromarray(arr)
    assert img16.mode.startswith("I")
    path = _save(img16, tmp_path / "d.png")
    assert load_image(path).getpixel((0, 0))[0] == 128
    assert load_image(arr).getpixel((0, 0))[0] == 128


def test_arrays(tmp_path):
    f = np.full((40, 40, 3), 0.5, dtype=np.float32)
    assert load_image(f).getpixel((1, 1)) == (128, 128, 128)
    chw = np.zeros((3, 40, 50), dtype=np.uint8)
    assert load_image(chw).size == (50, 40)
    with pytest.raises(ImageError, match="not an image"):
        load_image(np.zeros((4, 5, 6, 7)))


def test_bad_files_name_the_file(tmp_path):
    txt = tmp_path / "notes.jpg"
    txt.write_text("hello")
    with pytest.raises(ImageError, match="notes.jpg.*not an image"):
        load_image(txt)
    good = _save(Image.new("RGB", (200, 200), (1, 2, 3)), tmp_path / "t.png")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ImageError, match="trunc.png.*truncated"):
        load_image(trunc)
    with pytest.raises(ImageError, match="too small"):
        load_image(_save(Image.new("RGB", (10, 300)), tmp_path / "thin.png"))
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_center_crop_resize_and_range():
    arr = np.zeros((60, 100, 3), dtype=np.uint8)
    arr[:, 20:80] = 255  # the central 60×60 square is white, the sides black
    img = center_crop_resize(Image.fromarray(arr), 32)
    assert img.size == (32, 32) and np.asarray(img).min() == 255
    x = prepare_image(arr, 32)
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.ones_like(x))
    assert image_to_tensor(Image.new("RGB", (8, 8))).min() == -1.0
