"""How much reconstruction quality each precision loses against fp32 (issue #3: "report how much PSNR each
precision loses"). A benchmark, not a test.

    python scripts/precision_benchmark.py --out benchmarks/precision-tiny
    python scripts/precision_benchmark.py --model /path/to/sd15 --images my_photos/ --captions c.jsonl \
        --precisions 32-true,bf16-mixed,16-mixed --out benchmarks/precision-sd15

Each precision runs the whole ``nti invert`` pipeline (``run_inversion``) on the same images, so the
inversion *and* the reconstruction (sampler replay from z̄_T with {∅_t}) run under that precision, as a user
would run them. Per image it reads the manifest's PSNR of the NTI reconstruction against the input and
against the VAE round trip, the latent MSE to z*_0, inner steps and GradScaler-skipped steps, and reports each
mixed mode's PSNR loss against ``32-true``. Writes ``precision.json`` and ``precision.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from nti_lightning.config import load_config
from nti_lightning.run import read_manifest, run_inversion


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="model.spec: tiny, a diffusers folder, a single file")
    p.add_argument("--images", nargs="*", default=[], help="images/folders; default: the bundled samples")
    p.add_argument("--captions", default=None)
    p.add_argument("--precisions", default="32-true,bf16-mixed,16-mixed")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--config", default=None, help="a YAML config (default: the package defaults)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = leave)")
    p.add_argument("--out", default="benchmarks/precision-tiny")
    p.add_argument("overrides", nargs="*", help="config key=value, e.g. inversion.num_ddim_steps=20")
    return p.parse_args(argv)


def run_one(args: argparse.Namespace, precision: str, out: Path) -> dict:
    overrides = [
        f"model.spec={args.model}",
        f"trainer.precision={precision}",
        f"trainer.accelerator={args.accelerator}",
        f"output.dir={out}",
        "output.save_strip=false",
        "output.compute_baseline=false",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    if args.images:
        cfg.data.images = list(args.images)
        cfg.data.captions = args.captions
    t0 = time.perf_counter()
    summary = run_inversion(cfg, overwrite=True, quiet=True)
    seconds = time.perf_counter() - t0
    per_image = {}
    for k, r in sorted(read_manifest(out).items()):
        if r["status"] != "ok":
            per_image[k] = {"status": r["status"], "error": r.get("error")}
            continue
        m = r["metrics"]
        per_image[k] = {
            "status": "ok",
            "psnr_vs_input": m["nti"]["vs_input"]["psnr"],
            "psnr_vs_vae": m["nti"]["vs_vae"]["psnr"],
            "latent_mse": m["nti_latent_mse"],
            "inner_steps": m["inner_steps"],
            "skipped_steps": m["skipped_steps"],
        }
    return {"precision": precision, "seconds": seconds, "failed": summary.n_failed, "images": per_image}


def compare(runs: dict[str, dict]) -> list[dict]:
    """Per precision: mean PSNR and its loss against fp32 (mean and worst image)."""
    ref = runs["32-true"]["images"]
    rows = []
    for prec, run in runs.items():
        ok = {k: v for k, v in run["images"].items() if v["status"] == "ok" and ref.get(k, {}).get("status") == "ok"}
        if not ok:
            rows.append({"precision": prec, "images": 0})
            continue
        row = {"precision": prec, "images": len(ok), "seconds_per_image": run["seconds"] / len(run["images"])}
        for key in ("psnr_vs_input", "psnr_vs_vae"):
            row[key] = statistics.fmean(v[key] for v in ok.values())
            losses = [ref[k][key] - v[key] for k, v in ok.items()]
            row[f"loss_{key}"] = statistics.fmean(losses)
            row[f"worst_loss_{key}"] = max(losses)
        row["latent_mse"] = statistics.fmean(v["latent_mse"] for v in ok.values())
        row["inner_steps"] = statistics.fmean(v["inner_steps"] for v in ok.values())
        row["skipped_steps"] = sum(v["skipped_steps"] for v in ok.values())
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| precision | images | PSNR vs input | loss vs fp32 (mean / worst) | PSNR vs VAE round trip | "
             "loss vs fp32 (mean / worst) | latent MSE | inner steps | GradScaler skips | s/img |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if not r["images"]:
            lines.append(f"| {r['precision']} | 0 | – | – | – | – | – | – | – | – |")
            continue
        lines.append(
            f"| {r['precision']} | {r['images']} | {r['psnr_vs_input']:.2f} dB | "
            f"{r['loss_psnr_vs_input']:+.3f} / {r['worst_loss_psnr_vs_input']:+.3f} dB | {r['psnr_vs_vae']:.2f} dB | "
            f"{r['loss_psnr_vs_vae']:+.3f} / {r['worst_loss_psnr_vs_vae']:+.3f} dB | {r['latent_mse']:.2e} | "
            f"{r['inner_steps']:.0f} | {r['skipped_steps']} | {r['seconds_per_image']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if "32-true" not in precisions:
        precisions.insert(0, "32-true")
    runs = {}
    for prec in precisions:
        runs[prec] = run_one(args, prec, out / "runs" / prec)
        print(f"{prec}: {runs[prec]['seconds']:.1f} s, {runs[prec]['failed']} failed", flush=True)
    rows = compare(runs)
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    header = (f"Precision vs fp32, model `{args.model}`, overrides {args.overrides or 'none'}, "
              f"{'cuda' if torch.cuda.is_available() and args.accelerator != 'cpu' else 'cpu'} ({machine}). "
              "Loss = fp32 PSNR − this precision's PSNR (positive = worse).")  # fmt: skip
    md = to_markdown(rows, header)
    (out / "precision.json").write_text(json.dumps({"runs": runs, "summary": rows, "header": header}, indent=2))
    (out / "precision.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
