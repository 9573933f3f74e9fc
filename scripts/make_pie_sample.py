"""Write the 10-entry PIE-Bench-format sample in nti_lightning/assets/pie_sample/ (deterministic, offline).

Each scene is drawn procedurally with Pillow + NumPy (gradients, seeded noise texture, soft shading, a slight blur)
so that it looks vaguely photographic; the edited object is drawn into a mask layer at the same time, and the mask
is stored as PIE's run-length list. Run:  python scripts/make_pie_sample.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from nti_lightning.eval.pie import EDITING_TYPES, encode_rle

S = 512
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "nti_lightning" / "assets" / "pie_sample"
Box = tuple[int, int, int, int]


def gradient(top: tuple[int, int, int], bottom: tuple[int, int, int], h: int = S) -> np.ndarray:
    """Vertical colour gradient, float (h, S, 3)."""
    a = np.linspace(0, 1, h)[:, None, None]
    return np.broadcast_to((1 - a) * np.array(top) + a * np.array(bottom), (h, S, 3)).astype(np.float64)


def textured(img: np.ndarray, rng: np.random.Generator, amp: float) -> np.ndarray:
    """Add blurred multi-scale noise (grass, wood, sand ... texture)."""
    fine = rng.normal(0, amp, img.shape[:2])
    coarse = np.kron(rng.normal(0, amp, (img.shape[0] // 16 + 1, S // 16 + 1)), np.ones((16, 16)))
    return img + (fine + coarse[: img.shape[0], :S])[..., None]


def shaded_ellipse(canvas: np.ndarray, box: Box, colour: tuple[int, int, int], light: float = 0.6) -> None:
    """Ellipse with a radial highlight (a ball, a sun, a head), drawn in place."""
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[0:S, 0:S]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    d = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    inside = d <= 1
    hl = np.hypot((xx - cx + 0.35 * rx) / rx, (yy - cy + 0.35 * ry) / ry)
    shade = np.clip(1.25 - light * hl, 0.35, 1.3)
    canvas[inside] = np.array(colour)[None] * shade[inside][:, None]


def ellipse_mask(box: Box) -> np.ndarray:
    m = Image.new("L", (S, S), 0)
    ImageDraw.Draw(m).ellipse(box, fill=255)
    return np.asarray(m) > 127


def polygon_mask(points: list[tuple[int, int]]) -> np.ndarray:
    m = Image.new("L", (S, S), 0)
    ImageDraw.Draw(m).polygon(points, fill=255)
    return np.asarray(m) > 127


def rect_mask(box: Box) -> np.ndarray:
    m = Image.new("L", (S, S), 0)
    ImageDraw.Draw(m).rectangle(box, fill=255)
    return np.asarray(m) > 127


def paint(
    canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], rng: np.random.Generator, amp: float = 6.0
) -> None:
    """Fill ``mask`` with a slightly noisy flat colour, in place."""
    canvas[mask] = np.array(colour)[None] + rng.normal(0, amp, (int(mask.sum()), 1))


def sky_and_ground(rng: np.random.Generator, sky: tuple, ground: tuple, horizon: int, amp: float = 10.0) -> np.ndarray:
    img = np.zeros((S, S, 3))
    img[:horizon] = textured(gradient(sky[0], sky[1], horizon), rng, 2.0)
    img[horizon:] = textured(gradient(ground[0], ground[1], S - horizon), rng, amp)
    return img


def scene_ball(rng):
    img = sky_and_ground(rng, ((120, 170, 230), (200, 225, 250)), ((70, 140, 50), (40, 95, 30)), 220, 14)
    box = (190, 250, 330, 390)
    shaded_ellipse(img, box, (205, 30, 30))
    return img, ellipse_mask(box)


def scene_house(rng):
    img = sky_and_ground(rng, ((90, 150, 220), (190, 215, 245)), ((90, 150, 60), (60, 110, 40)), 340, 12)
    paint(img, rect_mask((150, 230, 370, 400)), (225, 210, 180), rng)
    paint(img, rect_mask((235, 300, 285, 400)), (110, 70, 40), rng)
    paint(img, rect_mask((170, 260, 215, 300)), (150, 200, 230), rng, 3)
    paint(img, rect_mask((305, 260, 350, 300)), (150, 200, 230), rng, 3)
    roof = polygon_mask([(130, 232), (260, 120), (390, 232)])
    paint(img, roof, (180, 40, 35), rng, 8)
    return img, roof


def table_scene(rng):
    img = np.zeros((S, S, 3))
    img[:300] = textured(gradient((235, 228, 215), (205, 195, 180), 300), rng, 2.0)
    wood = gradient((150, 100, 60), (110, 70, 40), S - 300)
    stripes = 12 * np.sin(np.linspace(0, 40, S))[None, :, None] + rng.normal(0, 4, (S - 300, S, 1))
    img[300:] = wood + stripes
    return img


def draw_cup(img, rng, colour=(240, 240, 235)):
    body = rect_mask((170, 220, 290, 360))
    handle = ellipse_mask((270, 250, 330, 320)) & ~ellipse_mask((285, 265, 315, 305))
    cup = body | handle
    paint(img, cup, colour, rng, 4)
    img[body] *= np.linspace(0.8, 1.05, S)[None, :].repeat(S, 0)[body][:, None]
    return cup


def scene_cup(rng):
    img = table_scene(rng)
    return img, draw_cup(img, rng)


def scene_cup_spoon_spot(rng):
    img = table_scene(rng)
    draw_cup(img, rng)
    return img, rect_mask((340, 300, 470, 380))


def draw_cat(img, rng, lying: bool = False):
    fur = (120, 110, 100)
    body_box = (140, 300, 380, 420) if lying else (180, 230, 330, 420)
    head_box = (110, 240, 210, 340) if lying else (200, 140, 310, 250)
    body, head = ellipse_mask(body_box), ellipse_mask(head_box)
    hx0, hy0, hx1, _ = head_box
    ears = polygon_mask([(hx0 + 5, hy0 + 30), (hx0 + 20, hy0 - 25), (hx0 + 45, hy0 + 10)])
    ears |= polygon_mask([(hx1 - 45, hy0 + 10), (hx1 - 20, hy0 - 25), (hx1 - 5, hy0 + 30)])
    tail = polygon_mask([(330, 400), (420, 330), (430, 345), (345, 415)])
    cat = body | head | ears | tail
    paint(img, cat, fur, rng, 12)
    for ex in (hx0 + 30, hx1 - 30):
        eye = ellipse_mask((ex - 8, hy0 + 40, ex + 8, hy0 + 55))
        paint(img, eye, (60, 160, 60), rng, 2)
    return cat


def rug_scene(rng):
    img = np.zeros((S, S, 3))
    img[:] = textured(gradient((210, 200, 185), (180, 170, 150)), rng, 2.0)
    rug = ellipse_mask((40, 330, 470, 500))
    paint(img, rug, (150, 40, 45), rng, 10)
    return img


def scene_cat(rng):
    img = rug_scene(rng)
    return img, draw_cat(img, rng)


def scene_cat_ball(rng):
    img = rug_scene(rng)
    draw_cat(img, rng)
    box = (380, 380, 450, 450)
    shaded_ellipse(img, box, (40, 80, 200))
    return img, ellipse_mask(box)


def scene_sun(rng):
    img = sky_and_ground(rng, ((250, 190, 120), (250, 225, 180)), ((40, 90, 150), (20, 50, 100)), 330, 6)
    box = (180, 80, 330, 230)
    shaded_ellipse(img, box, (255, 215, 60), light=0.3)
    face = ellipse_mask(box)
    for ex in (225, 285):
        paint(img, ellipse_mask((ex - 8, 130, ex + 8, 146)), (60, 40, 20), rng, 2)
    paint(img, ellipse_mask((215, 165, 295, 200)) & ~ellipse_mask((215, 150, 295, 190)), (60, 40, 20), rng, 2)
    return img, face


def scene_car(rng):
    img = sky_and_ground(rng, ((150, 190, 235), (215, 230, 245)), ((95, 95, 100), (60, 60, 65)), 300, 8)
    body = rect_mask((110, 300, 400, 370)) | polygon_mask([(170, 300), (210, 245), (320, 245), (360, 300)])
    paint(img, body, (235, 200, 40), rng, 6)
    paint(img, polygon_mask([(190, 298), (220, 255), (310, 255), (340, 298)]), (140, 180, 210), rng, 3)
    wheels = ellipse_mask((140, 345, 200, 405)) | ellipse_mask((310, 345, 370, 405))
    paint(img, wheels, (25, 25, 25), rng, 3)
    return img, body | wheels


def scene_snowman(rng):
    img = sky_and_ground(rng, ((170, 190, 215), (220, 228, 238)), ((245, 247, 252), (215, 222, 235)), 260, 4)
    low, mid, top = (180, 300, 340, 460), (200, 200, 320, 315), (220, 125, 300, 210)
    for box in (low, mid, top):
        shaded_ellipse(img, box, (250, 250, 252), light=0.35)
    paint(img, polygon_mask([(260, 165), (300, 172), (260, 178)]), (240, 120, 20), rng, 3)
    snowman = ellipse_mask(low) | ellipse_mask(mid) | ellipse_mask(top)
    return img, ~snowman


def scene_lighthouse(rng):
    img = sky_and_ground(rng, ((100, 160, 220), (200, 220, 240)), ((30, 90, 140), (20, 60, 100)), 300, 7)
    paint(img, polygon_mask([(0, 330), (200, 300), (330, 340), (330, 512), (0, 512)]), (110, 100, 90), rng, 12)
    tower = polygon_mask([(190, 310), (215, 120), (255, 120), (280, 310)])
    paint(img, tower, (240, 240, 240), rng, 4)
    for y in (160, 230):
        paint(img, tower & rect_mask((0, y, S, y + 30)), (200, 40, 40), rng, 4)
    paint(img, rect_mask((208, 90, 262, 120)), (60, 60, 60), rng, 3)
    return img, np.ones((S, S), dtype=bool)


SCENES: list[tuple[str, str, Callable, str, str, str, str]] = [
    # (editing_type_id, name, scene, original_prompt, editing_prompt, editing_instruction, blended_word)
    (
        "0",
        "house",
        scene_house,
        "a house with a red roof on a green lawn",
        "a house with a [blue] roof on a green lawn",
        "Make the roof blue",
        "roof roof",
    ),
    (
        "1",
        "ball",
        scene_ball,
        "a red ball on green grass",
        "a red [apple] on green grass",
        "Change the ball into an apple",
        "ball apple",
    ),
    (
        "2",
        "cup_spoon",
        scene_cup_spoon_spot,
        "a white cup on a wooden table",
        "a white cup [and a spoon] on a wooden table",
        "Add a spoon next to the cup",
        "",
    ),
    (
        "3",
        "cat_ball",
        scene_cat_ball,
        "a grey cat sitting on a red rug [with a blue ball]",
        "a grey cat sitting on a red rug",
        "Remove the blue ball",
        "",
    ),
    (
        "4",
        "sun",
        scene_sun,
        "a smiling sun over the sea",
        "a [frowning] sun over the sea",
        "Make the sun frown",
        "sun sun",
    ),
    (
        "5",
        "cat",
        scene_cat,
        "a grey cat sitting on a red rug",
        "a grey cat [lying] on a red rug",
        "Make the cat lie down",
        "cat cat",
    ),
    (
        "6",
        "car",
        scene_car,
        "a yellow car on a grey road",
        "a [red] car on a grey road",
        "Paint the car red",
        "car car",
    ),
    (
        "7",
        "cup",
        scene_cup,
        "a white cup on a wooden table",
        "a [glass] cup on a wooden table",
        "Make the cup out of glass",
        "cup cup",
    ),
    (
        "8",
        "snowman",
        scene_snowman,
        "a snowman in a snowy field",
        "a snowman [on a sandy beach]",
        "Put the snowman on a beach",
        "",
    ),
    (
        "9",
        "lighthouse",
        scene_lighthouse,
        "a lighthouse by the sea",
        "a [watercolor painting of a] lighthouse by the sea",
        "Make it a watercolor painting",
        "",
    ),
]


def render(scene: Callable, seed: int) -> tuple[Image.Image, np.ndarray]:
    """Draw one scene → (RGB image softened by a slight blur, bool mask of the edited region)."""
    img, mask = scene(np.random.default_rng(seed))
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    return pil.filter(ImageFilter.GaussianBlur(0.8)), mask


def write_sample(out: Path) -> dict[str, dict]:
    """Write annotation_images/, mapping_file.json and README.md under ``out``; returns the mapping."""
    mapping: dict[str, dict] = {}
    for n, (type_id, name, scene, src, edit, instruction, blended) in enumerate(SCENES):
        entry_id = f"{type_id}{n:011d}"
        rel = f"{type_id}_{EDITING_TYPES[type_id].replace(' ', '_')}/{entry_id}.jpg"
        image, mask = render(scene, seed=1000 + n)
        (out / "annotation_images" / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(out / "annotation_images" / rel, quality=88, optimize=True)
        mapping[entry_id] = {
            "image_path": rel,
            "original_prompt": src,
            "editing_prompt": edit,
            "editing_instruction": instruction,
            "editing_type_id": type_id,
            "blended_word": blended,
            "mask": encode_rle(mask),
        }
    (out / "mapping_file.json").write_text(json.dumps(mapping, indent=1) + "\n", encoding="utf-8")
    return mapping


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    mapping = write_sample(out)
    print(f"wrote {len(mapping)} entries to {out}")


if __name__ == "__main__":
    main()
