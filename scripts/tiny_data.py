"""Training and evaluation images for the embedded tiny models (used by ``train_tiny.py``, ``measure_tiny.py``).

Everything ships offline inside installed wheels (scikit-image, matplotlib, scikit-learn) or is generated
here from a seed. Three pools:

- ``TRAIN_PHOTOS``: bundled photographs used for training, each with its author and licence;
- procedural colour scenes (``procedural_scene``): gradients, shapes, colour textures, blurred and sharp,
  so that the VAE learns to keep saturated colour and edges (most bundled photographs are grey);
- ``EVAL_PHOTOS``: held-out colour photographs, **never** trained on: scikit-image's astronaut, chelsea,
  coffee and scikit-learn's china and flower.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import skimage
import sklearn
import torch
from PIL import Image, ImageDraw, ImageFilter

SKIMAGE_DATA = Path(skimage.__file__).resolve().parent / "data"
MPL_DATA = Path(matplotlib.__file__).resolve().parent / "mpl-data" / "sample_data"
SKLEARN_IMAGES = Path(sklearn.__file__).resolve().parent / "datasets" / "images"

# (folder, file, what, author / source, licence); licences from the skimage.data docstrings, matplotlib's
# sample_data and the original sources.
TRAIN_PHOTOS: list[tuple[Path, str, str, str, str]] = [
    (SKIMAGE_DATA, "rocket.jpg", "DSCOVR launch on Falcon 9 (colour)", "SpaceX (flickr spacexphotos)", "public domain"),
    (SKIMAGE_DATA, "hubble_deep_field.jpg", "Hubble eXtreme Deep Field (colour)", "NASA / HubbleSite", "public domain"),
    (SKIMAGE_DATA, "retina.jpg", "fundus photograph (colour)", "Mikael Häggström, Wikimedia Commons", "CC0 1.0"),
    (
        SKIMAGE_DATA,
        "ihc.png",
        "immunohistochemistry stain (colour)",
        "Center for Microscopy And Molecular Imaging (CMMI)",
        "no known copyright restrictions",
    ),
    (SKIMAGE_DATA, "color.png", "colour wheel", "scikit-image data", "BSD-3-Clause (scikit-image)"),
    (SKIMAGE_DATA, "logo.png", "scikit-image logo (colour)", "scikit-image", "BSD-3-Clause (scikit-image)"),
    (
        MPL_DATA,
        "grace_hopper.jpg",
        "portrait of Grace Hopper (colour)",
        "U.S. Navy, via matplotlib sample_data",
        "public domain",
    ),
    (
        MPL_DATA,
        "Minduka_Present_Blue_Pack.png",
        "clip-art present (colour)",
        "Minduka, openclipart via matplotlib",
        "public domain (openclipart)",
    ),
    (SKIMAGE_DATA, "camera.png", "man with a camera (grey)", "Lav Varshney", "CC0"),
    (SKIMAGE_DATA, "grass.png", "grass (grey)", "linolafett, DeviantArt", "CC0"),
    (SKIMAGE_DATA, "gravel.png", "gravel (grey)", "cc0textures.com, Gravel04", "CC0"),
    (SKIMAGE_DATA, "brick.png", "brick wall (grey)", "cc0textures.com, Bricks25", "CC0"),
    (SKIMAGE_DATA, "cell.png", "cell, quantitative phase image (grey)", "Paul Müller", "CC0"),
    (SKIMAGE_DATA, "clock_motion.png", "motion-blurred clock (grey)", "Stefan van der Walt", "public domain"),
    (SKIMAGE_DATA, "text.png", "handwritten equations (grey)", "Wikipedia 'Corner.png'", "public domain"),
    (SKIMAGE_DATA, "horse.png", "horse silhouette (grey)", "Andreas Preuss (marauder), openclipart", "CC0"),
    (
        SKIMAGE_DATA,
        "coins.png",
        "Greek coins (grey)",
        "Brooklyn Museum, via Wikimedia",
        "no known copyright restrictions",
    ),
]

# Held-out evaluation photographs: (folder, file, shipped demo name or None, caption)
EVAL_PHOTOS: list[tuple[Path, str, str | None, str]] = [
    (SKIMAGE_DATA, "chelsea.png", "cat.png", "a photo of a cat"),  # Stefan van der Walt, CC0
    (SKIMAGE_DATA, "coffee.png", "coffee.png", "a cup of coffee on a table"),  # Rachel Michetti, CC0
    (SKIMAGE_DATA, "astronaut.png", "astronaut.png", "a photo of an astronaut"),  # NASA, public domain
    (SKLEARN_IMAGES, "china.jpg", None, "a photo of a temple"),  # scikit-learn sample image (CC-BY 2.0, see docs)
    (SKLEARN_IMAGES, "flower.jpg", None, "a photo of a flower"),  # scikit-learn sample image (CC-BY 2.0, see docs)
]
EVAL_NAMES = {name for _, name, _, _ in EVAL_PHOTOS}
assert not EVAL_NAMES & {name for _, name, *_ in TRAIN_PHOTOS}


def load_rgb(folder: Path, name: str) -> Image.Image:
    """An RGB PIL image (grey replicated, alpha composited over white)."""
    image = Image.open(folder / name)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image)
    return image.convert("RGB")


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """Square centre crop resized with bicubic (Pillow's default for ``resize``)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → (3, H, W) in [-1, 1] (x / 127.5 − 1)."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def is_grey(image: Image.Image) -> bool:
    a = np.asarray(image.resize((64, 64)), dtype=np.float32)
    return float(np.abs(a - a.mean(2, keepdims=True)).mean()) < 2.0


def random_colour(rng: np.random.Generator, saturated: bool = True) -> np.ndarray:
    """A random RGB colour in [0, 255], via HSV (saturated ones have s ∈ [0.5, 1])."""
    h = rng.random()
    s = rng.uniform(0.5, 1.0) if saturated else rng.uniform(0.0, 0.6)
    v = rng.uniform(0.25, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255


def colourise(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A grey (H, W, 3) image mapped through a random two- or three-colour ramp: colourful natural texture."""
    g = grey.mean(2, keepdims=True) / 255.0
    stops = [random_colour(rng, saturated=rng.random() < 0.7) for _ in range(int(rng.integers(2, 4)))]
    stops.sort(key=lambda c: c.mean())
    if len(stops) == 2:
        return (1 - g) * stops[0] + g * stops[1]
    lo = np.clip(2 * g, 0, 1)
    hi = np.clip(2 * g - 1, 0, 1)
    return np.where(g < 0.5, (1 - lo) * stops[0] + lo * stops[1], (1 - hi) * stops[1] + hi * stops[2])


def colour_jitter(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Channel permutation, saturation and brightness jitter of an (H, W, 3) float image in [0, 255]."""
    if rng.random() < 0.5:
        a = a[..., rng.permutation(3)]
    grey = a.mean(2, keepdims=True)
    a = grey + (a - grey) * rng.uniform(0.8, 1.6)
    a = a * rng.uniform(0.8, 1.15) + rng.uniform(-15, 15)
    return np.clip(a, 0, 255)


def smooth_noise(size: int, scale: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) noise in [0, 1], bicubically upsampled from a (scale × scale) grid."""
    grid = (rng.random((scale, scale)) * 255).astype(np.uint8)
    up = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 255.0


def procedural_scene(size: int, rng: np.random.Generator) -> Image.Image:
    """A random colour scene: gradient background, textured colour fields, shapes, lines; some blur."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.clip((np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5, 0, 1)[..., None]
    c0, c1 = random_colour(rng, rng.random() < 0.6), random_colour(rng, rng.random() < 0.6)
    img = (1 - ramp) * c0 + ramp * c1
    if rng.random() < 0.6:  # coloured texture field
        n = smooth_noise(size, int(rng.integers(4, 40)), rng)[..., None]
        img = img * (1 - 0.6 * n) + 0.6 * n * random_colour(rng)
    canvas = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 14))):
        colour = tuple(int(v) for v in random_colour(rng, rng.random() < 0.8))
        kind = rng.integers(0, 4)
        x0, y0 = rng.integers(-size // 4, size, 2)
        w, h = rng.integers(size // 16, size // 2, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        elif kind == 2:
            pts = [
                tuple(int(v) for v in rng.integers(-size // 8, size + size // 8, 2))
                for _ in range(int(rng.integers(3, 7)))
            ]
            draw.polygon(pts, fill=colour)
        else:
            draw.line(box, fill=colour, width=int(rng.integers(1, 6)))
    if rng.random() < 0.5:
        canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 2.5))))
    a = np.asarray(canvas, dtype=np.float32)
    if rng.random() < 0.4:  # fine luminance grain
        a = a * (0.85 + 0.3 * smooth_noise(size, int(rng.integers(16, size // 2)), rng)[..., None])
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


class ImageBank:
    """Random training views: crops of the training photographs (colour-augmented) and procedural scenes."""

    def __init__(self, rng: np.random.Generator, procedural_fraction: float = 0.35, n_scenes: int = 160):
        self.rng = rng
        self.photos = [load_rgb(folder, name) for folder, name, *_ in TRAIN_PHOTOS]
        self.grey = [is_grey(p) for p in self.photos]
        self.scenes = [procedural_scene(192, rng) for _ in range(n_scenes)]
        self.procedural_fraction = procedural_fraction
        self.last_source, self.last_side = -1, 0

    def view(self, size: int, min_frac: float = 0.1) -> torch.Tensor:
        rng = self.rng
        if rng.random() < self.procedural_fraction:
            image, grey, k = self.scenes[rng.integers(len(self.scenes))], False, -1
        else:
            k = int(rng.integers(len(self.photos)))
            image, grey = self.photos[k], self.grey[k]
        self.last_source = k  # index into TRAIN_PHOTOS, −1 for a procedural scene
        w, h = image.size
        side = max(size // 2, int(min(w, h) * rng.uniform(min_frac, 1.0) ** 1.5))
        side = min(side, w, h)
        self.last_side = side  # the crop's side in source pixels (SDXL's "original size")
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        view = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        a = np.asarray(view, dtype=np.float32)
        if grey and rng.random() < 0.8:
            a = colourise(a, rng)
        elif rng.random() < 0.7:
            a = colour_jitter(a, rng)
        return torch.from_numpy(a / 127.5 - 1.0).permute(2, 0, 1).contiguous()

    def batch(self, n: int, size: int, min_frac: float = 0.1) -> torch.Tensor:
        return torch.stack([self.view(size, min_frac) for _ in range(n)])


def eval_images(size: int = 128) -> list[tuple[str, torch.Tensor]]:
    """The held-out photographs as (name, (3, size, size)) tensors in [-1, 1], centre-cropped."""
    return [(name, to_tensor(centre_crop(load_rgb(folder, name), size))) for folder, name, _, _ in EVAL_PHOTOS]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images (or batches, over all their values) in [-1, 1], measured on [0, 1] (the package's
    one PSNR, torchmetrics')."""
    from nti_lightning.metrics import psnr_per_image

    def flat(x: torch.Tensor) -> torch.Tensor:
        return ((x.clamp(-1, 1) + 1) / 2).reshape(1, 1, 1, -1)

    return float(psnr_per_image(flat(a), flat(b))[0])


def chroma(x: torch.Tensor) -> float:
    """Mean |pixel − its grey| (grey = mean of R, G, B) of an image in [-1, 1], in [0, 1] units."""
    x = (x.clamp(-1, 1) + 1) / 2
    return (x - x.mean(-3, keepdim=True)).abs().mean().item()


def bicubic_down_up(x: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Pillow bicubic shrink by ``factor`` and enlarge back, of a (3, H, W) tensor in [-1, 1]."""
    a = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    im = Image.fromarray(a)
    h, w = a.shape[:2]
    im = im.resize((w // factor, h // factor), Image.BICUBIC).resize((w, h), Image.BICUBIC)
    return to_tensor(im)
