"""Evaluation outputs: the records of every worker read back, summary JSON/Markdown, plot and image strips.

``nti eval`` records each finished (image, method) pair through the run layer (``store.records.RecordLog``: one
manifest line per pair, committed by its index entry, per worker). Here they are read back from every worker's
manifests (``read_records``: the latest record of each pair) and summarised. The Markdown table has the columns
of PIE-Bench's Table 1 (Ju et al., "PnP Inversion", ICLR 2024) with the same scalings (Structure ×10³, LPIPS
×10³, MSE ×10⁴, SSIM ×10²), plus the reconstruction's PSNR / SSIM / LPIPS (the inversion alone) and seconds and
UNet calls per image. Every file is written atomically (``store.files.atomic_write``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nti_lightning.store.files import atomic_save_image, atomic_write

log = logging.getLogger(__name__)
PER_IMAGE = "per_image.jsonl"
KEYS = ("id", "image_id", "method", "status", "finished_at", "rank", "shard", "done")
"""Record fields that are not measurements (left out of the means)."""
COLUMNS: tuple[tuple[str, str, float, int], ...] = (
    # (record key, column title, scale, decimals) — PIE-Bench Table 1
    ("structure_distance", "Structure Distance ×10³ ↓", 1e3, 2),
    ("psnr_bg", "Background PSNR ↑", 1.0, 2),
    ("lpips_bg", "LPIPS ×10³ ↓", 1e3, 2),
    ("mse_bg", "MSE ×10⁴ ↓", 1e4, 2),
    ("ssim_bg", "SSIM ×10² ↑", 1e2, 2),
    ("clip_whole", "CLIP Whole ↑", 1.0, 2),
    ("clip_edited", "CLIP Edited ↑", 1.0, 2),
    # the inversion alone (source prompt, no edit): not in PIE-Bench's table, which reports edits only
    ("psnr_rec", "Recon PSNR ↑", 1.0, 2),
    ("ssim_rec", "Recon SSIM ×10² ↑", 1e2, 2),
    ("lpips_rec", "Recon LPIPS ×10³ ↓", 1e3, 2),
    ("seconds", "s/image ↓", 1.0, 2),
    ("unet_calls", "UNet calls/image ↓", 1.0, 0),
)
MISSING = "—"


def pair_id(image_id: str, method: str) -> str:
    """The record id of one (image, method) pair."""
    return f"{image_id}/{method}"


def read_records(out: str | Path) -> list[dict]:
    """The finished pairs of every worker of OUT (its ``manifest*.jsonl``): the latest "ok" record of each pair,
    in the order they finished. A non-finite measurement, stored as null with ``<key>_nonfinite``, is NaN again."""
    from nti_lightning.store.manifest import read_manifest

    records = [_finite_back(r) for r in read_manifest(out).values() if r.get("status") == "ok" and "method" in r]
    return sorted(records, key=lambda r: float(r.get("finished_at") or 0.0))


def _finite_back(rec: dict) -> dict:
    out = dict(rec)
    for k, v in rec.items():
        if k.endswith("_nonfinite") and out.get(k[: -len("_nonfinite")]) is None:
            out[k[: -len("_nonfinite")]] = float(v)
            del out[k]
    return out


def finished(out: str | Path) -> set[tuple[str, str]]:
    """(image id, method) pairs with a finished record in OUT."""
    return {(str(r.get("image_id", r["id"])), str(r["method"])) for r in read_records(out)}


def summarize(records: Iterable[dict]) -> dict[str, dict[str, float]]:
    """{method: {metric: mean}} over images; the last record of an (id, method) wins; NaN/inf values are left out."""
    latest: dict[tuple[str, str], dict] = {}
    for r in records:
        latest[(str(r.get("image_id", r["id"])), str(r["method"]))] = r
    values: dict[str, dict[str, list[float]]] = {}
    for (_, method), r in latest.items():
        per = values.setdefault(method, {})
        for k, v in r.items():
            if k not in KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                per.setdefault(k, []).append(float(v))
    return {m: {k: float(np.mean(v)) for k, v in sorted(per.items())} for m, per in values.items()}


def markdown_table(summary: dict[str, dict[str, float]]) -> str:
    """The PIE-Bench Table 1 shaped table; a metric a method lacks shows as '—'."""
    head = "| Method | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    rows = [head, rule]
    for method, metrics in summary.items():
        cells = [_cell(metrics.get(key), scale, dec) for key, _, scale, dec in COLUMNS]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _cell(value: float | None, scale: float, decimals: int) -> str:
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{value * scale:.{decimals}f}"


def write_summary(
    out: str | Path, records: list[dict] | None = None, tmp_dir: Path | None = None, methods: Iterable[str] = ()
) -> dict:
    """Writes OUT/summary.json, OUT/summary.md, OUT/per_image.jsonl (every finished pair's record, one line each)
    and OUT/psnr_vs_time.png (if matplotlib is there) from ``records`` (default: ``read_records(out)``); returns
    the summary, its methods in the order of ``methods`` first."""
    out = Path(out)
    records = read_records(out) if records is None else records
    summary = summarize(records)
    summary = {m: summary[m] for m in dict.fromkeys([*methods, *summary]) if m in summary}
    atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode(), tmp_dir)
    counts = ", ".join(f"{m} {len(ids)}" for m, ids in _group_ids(records).items())
    table = markdown_table(summary) + f"\nImages per method: {counts}.\n"
    atomic_write(out / "summary.md", table.encode("utf-8"), tmp_dir)
    from nti_lightning.store.records import dumps

    lines = "".join(dumps(r) + "\n" for r in records)
    atomic_write(out / PER_IMAGE, lines.encode("utf-8"), tmp_dir)
    plot_psnr_vs_time(summary, out / "psnr_vs_time.png", tmp_dir)
    return summary


def _group_ids(records: Iterable[dict]) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    for r in records:
        groups.setdefault(str(r["method"]), set()).add(str(r.get("image_id", r["id"])))
    return groups


def plot_psnr_vs_time(summary: dict[str, dict[str, float]], path: str | Path, tmp_dir: Path | None = None) -> bool:
    """Background PSNR against seconds/image, one point per method. False (one log line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return False
    pts = {m: (s["seconds"], s["psnr_bg"]) for m, s in summary.items() if "seconds" in s and "psnr_bg" in s}
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for m, (x, y) in pts.items():
        ax.scatter([x], [y])
        ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("seconds / image")
    ax.set_ylabel("background PSNR (dB)")
    ax.set_title("PIE-Bench-format: background preservation vs time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png"), tmp_dir)
    plt.close(fig)
    return True


def _to_pil(image: Image.Image | np.ndarray, size: int) -> Image.Image:
    """PIL image, uint8 HWC array or float CHW/HWC array in [0, 1] → RGB PIL of ``size``×``size``."""
    if isinstance(image, Image.Image):
        im = image.convert("RGB")
    else:
        a = np.asarray(image)
        if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
            a = a.transpose(1, 2, 0)
        if a.dtype != np.uint8:
            a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
        im = Image.fromarray(a, "RGB")
    return im if im.size == (size, size) else im.resize((size, size), Image.BICUBIC)


def _labelled(image: Image.Image, label: str, band: int) -> Image.Image:
    tile = Image.new("RGB", (image.width, image.height + band), "white")
    tile.paste(image, (0, band))
    ImageDraw.Draw(tile).text((4, 3), label, fill="black", font=ImageFont.load_default())
    return tile


def image_strip(
    source, per_method: dict[str, tuple], path: str | Path, size: int = 256, gap: int = 4, tmp_dir: Path | None = None
) -> Image.Image:
    """One image's strip: source, then (reconstruction, edit) of each method, each tile labelled; saved to ``path``
    (atomically).

    ``per_method`` maps a method to (reconstruction, edit); either may be None (left out).
    """
    band = 16
    tiles = [_labelled(_to_pil(source, size), "source", band)]
    for method, pair in per_method.items():
        for kind, image in zip(("recon", "edit"), pair):
            if image is not None:
                tiles.append(_labelled(_to_pil(image, size), f"{method} {kind}", band))
    strip = Image.new("RGB", (len(tiles) * (size + gap) - gap, size + band), "white")
    for i, tile in enumerate(tiles):
        strip.paste(tile, (i * (size + gap), 0))
    atomic_save_image(Path(path), strip, tmp_dir)
    return strip
