"""Size and reconstruction loss of the null-embedding codecs (``nti_lightning/store/codec.py``). A benchmark,
not a test; docs/storage.md has its table.

    python scripts/codec_benchmark.py --out benchmarks/results/codec

1. Inverts the bundled sample photos with each tiny model at the default settings (T = 50, N = 10, w = 7.5).
2. Per codec and image: the record's bytes (``inversion_to_bytes``) and its ratio to codec "fp32" (the
   format-1 file, as written before codecs), max |Δ∅| over ∅_t's fields, and the PSNR of the NTI
   reconstruction against the VAE round trip with the decoded ∅_t, minus that with the fp32 ∅_t (dB lost).
3. zstd levels: bytes and encode time of the default and the exact codec.
4. The packing (``codec.PACKS``): the 2-byte codecs' bytes escape-packed (the default) and byte-shuffled.
5. SD1.5-shaped ∅_t (D = 768) from the random-weight network (``scripts/nti_bench/sd15.py``): the first
   ``--sd15-images`` photos inverted at ``--sd15-size`` px with T = ``--sd15-steps`` (50 by default: measured;
   fewer: extrapolated to T = 50 by ``extrapolate``, with the extrapolation checked on the tiny model against
   its measured T = 50); bytes per image and the 512-px record's ratio (size only: random weights make the
   images meaningless).
6. The large optional fields (proxnpi's trajectory, direct's corrections) through the exact codec.

Writes ``bench.json`` and ``bench.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # nti_bench, run as a script

from nti_lightning import invert, load_model  # noqa: E402
from nti_lightning.api import reconstruction_latents  # noqa: E402
from nti_lightning.data.image import prepare_image  # noqa: E402
from nti_lightning.engine.sampling import decode_latents, encode_latents  # noqa: E402
from nti_lightning.metrics import image_metrics  # noqa: E402
from nti_lightning.models.embedded import ASSETS_DIR  # noqa: E402
from nti_lightning.store.codec import decode, encode  # noqa: E402
from nti_lightning.store.codec_names import CODECS, DEFAULT_CODEC, LOSSLESS_CODEC, RAW_CODEC, ZSTD_LEVEL  # noqa: E402
from nti_lightning.store.inversion import inversion_from_bytes, inversion_to_bytes  # noqa: E402

SAMPLES = ASSETS_DIR / "samples"
MODELS = ("tiny", "tiny-sd2-v", "tiny-sdxl")
LEVELS = (1, 3, 10, 19)
TARGET_RATIO, TARGET_DB = 4.0, 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/codec")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--sd15-size", type=int, default=64, help="image size of the SD1.5-shaped inversion (px)")
    p.add_argument("--sd15-steps", type=int, default=50, help="T of the SD1.5-shaped inversion; 0 = skip it")
    p.add_argument("--sd15-images", type=int, default=1, help="sample photos of the SD1.5-shaped inversion")
    p.add_argument("--sd15-threads", type=int, default=2, help="torch threads of the SD1.5-shaped inversion")
    return p.parse_args(argv)


def samples() -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (SAMPLES / "captions.jsonl").read_text().splitlines() if line.strip()]
    return [str(SAMPLES / r["image"]) for r in rows], [r["prompt"] for r in rows]


def null_fields(inv) -> dict[str, torch.Tensor]:
    return {"null_embeddings": inv.null_embeddings, **inv.null_extra}


# ---------------------------------------------------------------------------------------------------------
# 2. Codecs on one tiny model
# ---------------------------------------------------------------------------------------------------------


def psnr_vs_vae(model, invs, vae_images) -> list[float]:
    images = decode_latents(model, reconstruction_latents(model, invs)).cpu()
    return [image_metrics(images[k], vae_images[k])["psnr"] for k in range(len(invs))]


def codec_rows(model, invs, vae_images) -> list[dict]:
    """One row per codec: bytes, ratio, max |Δ∅|, dB lost (mean, worst image), encode/decode ms."""
    fp32_bytes = [len(inversion_to_bytes(inv, RAW_CODEC)) for inv in invs]
    fp32_psnr = psnr_vs_vae(model, invs, vae_images)
    rows = []
    for codec in CODECS:
        t0 = time.perf_counter()
        blobs = [inversion_to_bytes(inv, codec) for inv in invs]
        t1 = time.perf_counter()
        back = [inversion_from_bytes(b, label=codec) for b in blobs]
        t2 = time.perf_counter()
        delta = max(
            float((null_fields(b)[k] - v).abs().max())
            for inv, b in zip(invs, back)
            for k, v in null_fields(inv).items()
        )
        lost = [a - b for a, b in zip(fp32_psnr, psnr_vs_vae(model, back, vae_images))]
        rows.append(
            {
                "codec": codec,
                "bytes": [len(b) for b in blobs],
                "ratio": [f / len(b) for f, b in zip(fp32_bytes, blobs)],
                "max_abs_delta": delta,
                "db_lost_mean": statistics.mean(lost),
                "db_lost_worst": max(lost),
                "encode_ms": 1e3 * (t1 - t0) / len(invs),
                "decode_ms": 1e3 * (t2 - t1) / len(invs),
            }
        )
    return rows


def tiny_model_result(name: str, images: list[str], prompts: list[str]) -> dict:
    model = load_model(name)
    t0 = time.perf_counter()
    invs = invert(model, images, prompts)
    seconds = time.perf_counter() - t0
    pixels = torch.stack([prepare_image(p, model.native_image_size) for p in images])
    vae_images = decode_latents(model, encode_latents(model, pixels.to(model.device))).cpu()
    return {
        "model": name,
        "invert_seconds": seconds,
        "shapes": {k: list(v.shape) for k, v in null_fields(invs[0]).items()},
        "inner_steps": [int(inv.inner_steps.sum()) for inv in invs],
        "fp32_psnr_vs_vae": psnr_vs_vae(model, invs, vae_images),
        "fp32_bytes": [len(inversion_to_bytes(inv, RAW_CODEC)) for inv in invs],
        "codecs": codec_rows(model, invs, vae_images),
        "_invs": invs,
    }


# ---------------------------------------------------------------------------------------------------------
# 3.–6. zstd levels, the extrapolation, SD1.5-shaped ∅_t, the optional fields
# ---------------------------------------------------------------------------------------------------------


def level_rows(tensors: list[torch.Tensor]) -> list[dict]:
    """Bytes and encode speed (the best of 3 passes) of the default and the exact codec at each zstd level."""
    rows = []
    for codec in (DEFAULT_CODEC, LOSSLESS_CODEC):
        for level in LEVELS:
            passes = []
            for _ in range(3):  # the first pass also pays for first-call costs
                t0 = time.perf_counter()
                size = sum(len(encode(x, codec, level)[0]) for x in tensors)
                passes.append(time.perf_counter() - t0)
            seconds = min(passes)
            raw = sum(4 * x.numel() for x in tensors)
            rows.append({"codec": codec, "level": level, "ratio": raw / size, "mb_per_s": raw / 1e6 / seconds})
    return rows


def null_bytes(inv, codec: str, rows: int | None = None, level: int = ZSTD_LEVEL) -> int:
    """Encoded bytes of ∅_t's fields (their first ``rows`` timesteps) at zstd ``level``."""
    return sum(len(encode(v[:rows].contiguous(), codec, level)[0]) for v in null_fields(inv).values())


def extrapolate(inv, codec: str, T: int = 50, level: int = ZSTD_LEVEL) -> dict:
    """∅_t's bytes at T from a record of T' < T steps: its T' rows' encoded bytes + (T − T') × the bytes each of
    its last two rows adds (prefixes of T' − 2 and T' rows encoded). The last rows' cost, not the first row's
    alone: the first row encoded by itself compresses unlike the same row inside a longer stream, and by
    different amounts at different zstd levels."""
    n = inv.num_steps
    if n < 3:
        raise ValueError(f"the extrapolation needs T' >= 3 steps, got {n}")
    whole, before = null_bytes(inv, codec, level=level), null_bytes(inv, codec, n - 2, level)
    per_row = (whole - before) / 2
    raw_row = sum(4 * v[0].numel() for v in null_fields(inv).values())
    return {
        "measured_bytes": whole,
        "bytes_per_further_row": per_row,
        "fp32_bytes_per_row": raw_row,
        f"predicted_bytes_T{T}": whole + (T - n) * per_row,
        f"ratio_T{T}": T * raw_row / (whole + (T - n) * per_row),
    }


def extrapolation_check(tiny_invs, images, prompts, steps: int) -> dict:
    short = invert(load_model("tiny"), images, prompts, num_ddim_steps=steps)
    rows = {}
    for codec in (DEFAULT_CODEC, LOSSLESS_CODEC):
        predicted = [extrapolate(inv, codec)["predicted_bytes_T50"] for inv in short]
        measured = [null_bytes(inv, codec) for inv in tiny_invs]
        rows[codec] = {"predicted": predicted, "measured": measured}
    return {"steps": steps, "codecs": rows}


def file_bytes_512(inv, codec: str, nulls_bytes: float, T: int = 50) -> float:
    """The bytes of an SD1.5 record at 512 px and T steps whose ∅_t take ``nulls_bytes`` encoded: a record of
    those shapes with ``inv``'s header (z_T = z*_T, as every method gives), its ∅_t's encoded bytes swapped for
    ``nulls_bytes`` (codec "fp32": the whole file as it is)."""
    from nti_lightning.store.inversion import Inversion

    z = torch.randn(3, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros(T, *inv.null_embeddings.shape[1:])
    rec = Inversion(z_T=z[0], null_embeddings=zeros, timesteps=torch.arange(T, 0, -1) * 20 - 19, prompt=inv.prompt,
                    pivot_z0=z[1], pivot_zT=z[0], inner_steps=torch.ones(T, dtype=torch.long),
                    final_loss=torch.zeros(T), meta=inv.meta)  # fmt: skip
    whole = len(inversion_to_bytes(rec, codec))
    return whole if codec == RAW_CODEC else whole - len(encode(zeros, codec)[0]) + nulls_bytes


def pack_rows(tensors: list[torch.Tensor]) -> list[dict]:
    """Bytes of the 2-byte codecs with a transform, escape-packed (their packing) and byte-shuffled."""
    rows = []
    for codec in (c for c in CODECS if c.startswith(("bf16-", "fp16-")) and c.count("-") == 2):
        size = {pack: sum(len(encode(x, codec, pack=pack)[0]) for x in tensors) for pack in ("escape", "shuffle")}
        raw = sum(4 * x.numel() for x in tensors)
        rows.append({"codec": codec, **{f"ratio_{k}": raw / v for k, v in size.items()}})
    return rows


def sd15_result(images, prompts, size: int, steps: int) -> dict:
    from nti_bench.sd15 import build_sd15_model

    model = build_sd15_model()
    t0 = time.perf_counter()
    invs = invert(model, images, prompts, num_ddim_steps=steps, image_size=size)
    seconds = time.perf_counter() - t0
    codecs = {}
    fp32_file = file_bytes_512(invs[0], RAW_CODEC, 0)
    for codec in CODECS[1:]:
        per_image = [extrapolate(inv, codec) for inv in invs]
        codecs[codec] = {k: statistics.mean(e[k] for e in per_image) for k in per_image[0]}
        codecs[codec]["file_ratio_512"] = fp32_file / file_bytes_512(
            invs[0], codec, codecs[codec]["predicted_bytes_T50"]
        )
    by_level = {}
    for level in LEVELS:
        nulls = statistics.mean(extrapolate(inv, DEFAULT_CODEC, level=level)["predicted_bytes_T50"] for inv in invs)
        by_level[level] = fp32_file / file_bytes_512(invs[0], DEFAULT_CODEC, nulls)
    return {
        "fp32_file_bytes_512": fp32_file,
        "default_file_ratio_by_level": by_level,
        "size": size,
        "steps": steps,
        "invert_seconds": seconds,
        "shape": list(invs[0].null_embeddings.shape),
        "inner_steps": [inv.inner_steps.tolist() for inv in invs],
        "codecs": codecs,
        "levels": level_rows([inv.null_embeddings for inv in invs]),
        "packs": pack_rows([inv.null_embeddings for inv in invs]),
    }


def optional_fields(images, prompts) -> dict:
    """proxnpi's trajectory (T + 1, C, h, w) and direct's corrections (T, C, h, w) through the exact codec."""
    model, out = load_model("tiny"), {}
    for method, name in (("proxnpi", "trajectory"), ("direct", "corrections")):
        invs = invert(model, images, prompts, method=method)
        xs = [getattr(inv, name) for inv in invs]
        assert all(torch.equal(decode(*encode(x, LOSSLESS_CODEC)), x) for x in xs)
        raw = sum(4 * x.numel() for x in xs)
        out[name] = {
            "method": method,
            "shape": list(xs[0].shape),
            "fp32_bytes": raw / len(xs),
            "record_ratio_default": statistics.mean(
                len(inversion_to_bytes(inv, RAW_CODEC)) / len(inversion_to_bytes(inv, DEFAULT_CODEC)) for inv in invs
            ),
            **{c: raw / sum(len(encode(x, c)[0]) for x in xs) for c in ("fp32-zstd", "fp32-xor-zstd", LOSSLESS_CODEC)},
        }
    return out


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def meets_target(models: list[dict]) -> list[str]:
    """Codecs ≥ TARGET_RATIO× smaller than the fp32 file for every image of every model, at ≤ TARGET_DB lost."""
    ok = []
    for codec in CODECS:
        rows = [next(r for r in m["codecs"] if r["codec"] == codec) for m in models]
        if all(min(r["ratio"]) >= TARGET_RATIO and r["db_lost_worst"] <= TARGET_DB for r in rows):
            ok.append(codec)
    return ok


def level_table(rows: list[dict], what: str) -> str:
    lines = [f"zstd level on {what} (∅_t alone; MB/s of fp32 input):", "", "| codec | level | × smaller | MB/s |"]
    lines += ["|---|---|---|---|"]
    lines += [f"| {r['codec']} | {r['level']} | {r['ratio']:.2f} | {r['mb_per_s']:.0f} |" for r in rows]
    return "\n".join(lines)


def pack_table(rows: list[dict], what: str) -> str:
    lines = [f"Packing on {what} (∅_t alone, × smaller than fp32):", "", "| codec | escape | byte shuffle |"]
    lines += ["|---|---|---|"]
    lines += [f"| {r['codec']} | {r['ratio_escape']:.2f} | {r['ratio_shuffle']:.2f} |" for r in rows]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    lines = [f"# Null-embedding codecs\n\n`{result['command']}`\n\n{result['machine']}\n"]
    for m in result["models"]:
        kb = statistics.mean(m["fp32_bytes"]) / 1e3
        lines += [
            f"## {m['model']}: ∅_t {m['shapes']}, fp32 file {kb:.1f} kB, NTI PSNR vs VAE round trip "
            f"{', '.join(f'{p:.2f}' for p in m['fp32_psnr_vs_vae'])} dB\n",
            "| codec | kB / image | × smaller (min–max) | max abs Δ∅ | dB lost mean | dB lost worst "
            "| enc ms | dec ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in m["codecs"]:
            lines.append(
                f"| {r['codec']} | {statistics.mean(r['bytes']) / 1e3:.1f} "
                f"| {min(r['ratio']):.2f}–{max(r['ratio']):.2f} "
                f"| {r['max_abs_delta']:.2e} | {r['db_lost_mean']:+.4f} | {r['db_lost_worst']:+.4f} "
                f"| {r['encode_ms']:.1f} | {r['decode_ms']:.1f} |"
            )
        lines.append("")
    ok = result["meets_target"]
    lines.append(
        f"**Target (≥ {TARGET_RATIO:g}× smaller than the fp32 file, ≤ {TARGET_DB} dB lost, every image of every "
        f"tiny model): {'met by ' + ', '.join(ok) if ok else 'not met'}.** Default: {DEFAULT_CODEC}; exact: "
        f"{LOSSLESS_CODEC}; zstd level {ZSTD_LEVEL}.\n"
    )
    lines += [level_table(result["tiny_levels"], "tiny, the ∅_t above"), ""]
    lines += [pack_table(result["tiny_packs"], "tiny, the ∅_t above"), ""]
    ex = result.get("extrapolation")
    if ex:
        lines += [f"## Extrapolation check (tiny: T = {ex['steps']} → 50 vs measured at T = 50, ∅_t bytes)\n"]
        for codec, v in ex["codecs"].items():
            ratios = [p / m for p, m in zip(v["predicted"], v["measured"])]
            lines.append(f"- {codec}: predicted / measured = {', '.join(f'{x:.2f}' for x in ratios)}")
        lines.append("")
    sd = result.get("sd15")
    if sd:
        lines += [
            f"## SD1.5-shaped ∅_t (random weights, {sd['size']} px, T = {sd['steps']}, ∅_t {sd['shape']}; "
            f"inner steps {sd['inner_steps']}; size only)\n",
            f"| codec | ∅_t kB (T = {sd['steps']}) | kB per further row | fp32 kB per row "
            f"| ∅_t MB at T = 50 ({'measured' if sd['steps'] == 50 else 'extrapolated'}) "
            f"| × smaller at T = 50 | 512-px record × smaller (fp32: {sd['fp32_file_bytes_512'] / 1e6:.2f} MB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for codec, e in sd["codecs"].items():
            lines.append(
                f"| {codec} | {e['measured_bytes'] / 1e3:.1f} | {e['bytes_per_further_row'] / 1e3:.1f} "
                f"| {e['fp32_bytes_per_row'] / 1e3:.1f} | {e['predicted_bytes_T50'] / 1e6:.2f} | {e['ratio_T50']:.2f} "
                f"| {e['file_ratio_512']:.2f} |"
            )
        by_level = ", ".join(f"level {k} {v:.2f}×" for k, v in sd["default_file_ratio_by_level"].items())
        how = "measured ∅_t" if sd["steps"] == 50 else "the same extrapolation"
        lines += ["", f"The 512-px {DEFAULT_CODEC} record by zstd level ({how}): {by_level}.", ""]
        lines += [level_table(sd["levels"], "these ∅_t"), ""]
        lines += [pack_table(sd["packs"], "these ∅_t"), ""]
    opt = result["optional_fields"]
    lines += ["## Optional fields through the exact codecs (tiny, × smaller than fp32)\n"]
    for name, o in opt.items():
        ratios = ", ".join(f"{c} {o[c]:.2f}" for c in ("fp32-zstd", "fp32-xor-zstd", LOSSLESS_CODEC))
        lines.append(
            f"- {name} ({o['method']}, {o['shape']}, {o['fp32_bytes'] / 1e3:.1f} kB): {ratios}; the {o['method']} "
            f"record with {DEFAULT_CODEC} (∅_t exact: ψ at every step) {o['record_ratio_default']:.2f}× smaller"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, prompts = samples()
    # 1.–3. the tiny models
    models = [tiny_model_result(name, images, prompts) for name in args.models.split(",")]
    tiny = next(m for m in models if m["model"] == "tiny")
    result = {
        "command": "python " + " ".join([f"scripts/{Path(__file__).name}", *(argv or sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "models": models,
        "meets_target": meets_target(models),
        "tiny_levels": level_rows([inv.null_embeddings for inv in tiny["_invs"]]),
        "tiny_packs": pack_rows([inv.null_embeddings for inv in tiny["_invs"]]),
    }
    # 5.–6. SD1.5-shaped ∅_t (the extrapolation check when it is extrapolated), the optional fields
    if 0 < args.sd15_steps < 50:
        result["extrapolation"] = extrapolation_check(tiny["_invs"], images, prompts, args.sd15_steps)
    if args.sd15_steps:
        torch.set_num_threads(args.sd15_threads)
        n = args.sd15_images
        result["sd15"] = sd15_result(images[:n], prompts[:n], args.sd15_size, args.sd15_steps)
        torch.set_num_threads(args.threads)
    result["optional_fields"] = optional_fields(images, prompts)
    for m in models:
        del m["_invs"]
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
