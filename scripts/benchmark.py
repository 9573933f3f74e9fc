"""Throughput of null-text inversion: the authors' loop against the slot engine, equality checked first.

    python scripts/benchmark.py --threads 1 --out benchmarks/results/cpu-tiny          # the issue's CPU table
    python scripts/benchmark.py --model sd15 --batch-sizes 1,8,16,32 --images 32 --precision bf16-mixed

In one run, in numbered steps: (1) the model (``--model tiny``: the embedded trained model; ``sd15``: SD1.5
shapes, random weights); (2) the authors' ``NullInversion`` loop one image at a time (``bench.baseline``) as
distributed (UNet weights requiring grad, their explicit-softmax attention hook) and with frozen weights;
(3) the slot engine over the same images at each batch size (rows per UNet call; ``2·rows − 1`` slots, a
freed slot refilled at once) and, for comparison, in fixed batches (``--fixed``: no refill, each batch waits
for its slowest image, as a lockstep engine does); (4) equality: every engine result's pivot z_T and its
reconstruction z̄_0 against the authors' loop on the same image, and the mean reconstruction error of both;
no ratio is printed unless it passes; (5) JSON, a markdown table and a plot (images/s vs batch size).
Early stop on and off (``--early-stop both``). T and N default to the authors' 50 and 10.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from nti_bench import build_bench_model, prompts_for, synthetic_images
from nti_lightning.config import InversionConfig
from nti_lightning.data.image import prepare_image
from nti_lightning.engine.reference import baseline_invert
from nti_lightning.engine.runtime import Runtime
from nti_lightning.engine.slots import Admission, Failed, Finished, SlotEngine
from nti_lightning.p2p.attention import P2PAttnProcessor, place_in_unet


def authors_attention(name: str):
    """Their ``register_attention_control``: every attention layer through an explicit softmax (an identity
    Prompt-to-Prompt controller)."""
    return P2PAttnProcessor(lambda a, c, p: a, place_in_unet(name))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, sd15 (random weights) or a local diffusers folder")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--batch-sizes", default="1,4,8,16", help="rows per UNet call, comma-separated")
    p.add_argument("--images", type=int, default=16, help="images per engine configuration")
    p.add_argument("--baseline-images", type=int, default=4, help="images inverted by the authors' loop")
    p.add_argument("--num-ddim-steps", type=int, default=50)
    p.add_argument("--num-inner-steps", type=int, default=10)
    p.add_argument("--early-stop", choices=("both", "on", "off"), default="both")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's native size")
    p.add_argument("--precision", default="32-true", help="32-true, bf16-mixed or 16-mixed")
    p.add_argument("--fixed", action="store_true", help="also time fixed batches (no slot refill)")
    p.add_argument("--photos", action="store_true", help="the bundled sample photos (cycled) instead of noise")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--latent-tol", type=float, default=1e-2, help="max |Δ| of z̄_0, engine vs authors' loop")
    p.add_argument("--pivot-tol", type=float, default=1e-3, help="max |Δ| of z*_T, engine vs authors' loop")
    p.add_argument(
        "--authors-repo",
        type=Path,
        default=None,
        help="a prompt-to-prompt checkout: also time the authors' own NullInversion (bench.authors_code)",
    )
    p.add_argument("--repeats", type=int, default=1, help="rounds of every configuration, in turn; medians reported")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"))
    return p.parse_args(argv)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def images_for(args, model, n: int) -> tuple[list[torch.Tensor], list[str]]:
    size = args.image_size or model.native_image_size
    if args.photos:
        from nti_lightning.data.items import SAMPLES_DIR

        files = sorted(SAMPLES_DIR.glob("*.png"))
        pixels = [prepare_image(str(files[k % len(files)]), size) for k in range(n)]
        return pixels, [f"a photo of a {files[k % len(files)].stem}" for k in range(n)]
    return list(synthetic_images(n, size)), prompts_for(n)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_baseline(model, pixels, prompts, cfg, **kw) -> tuple[float, list]:
    out, t0 = [], time.perf_counter()
    for px, p in zip(pixels, prompts):
        out.append(baseline_invert(model, px[None], p, cfg, **kw))
    sync(model.device)
    return (time.perf_counter() - t0) / len(pixels), out


def run_authors(model, pixels, prompts, cfg, repo: Path) -> tuple[float, list]:
    """The authors' own ``NullInversion.invert`` per image (timed), then its nulls replayed by our guided DDIM
    sampler for z̄_0 (not timed), so the equality check compares it like the re-implementation."""
    from nti_bench.authors_code import AuthorsNullInversion
    from nti_lightning.engine.ddim import schedule_from_scheduler
    from nti_lightning.engine.reference import BaselineResult
    from nti_lightning.engine.sampling import ddim_sample, encode_latents
    from nti_lightning.text import encode_text

    runner = AuthorsNullInversion(repo, model, cfg.num_ddim_steps, cfg.guidance_scale, cfg.num_inner_steps,
                                  cfg.early_stop_epsilon if cfg.early_stop else -1.0)  # fmt: skip
    t0, raw = time.perf_counter(), []
    for px, p in zip(pixels, prompts):
        raw.append(runner.invert(px, p))
    sync(model.device)
    seconds = (time.perf_counter() - t0) / len(pixels)
    schedule = schedule_from_scheduler(model.scheduler, cfg.num_ddim_steps)
    denoise = Runtime().denoiser(model.unet, model.family)
    out = []
    for px, p, (z_T, nulls) in zip(pixels, prompts, raw):
        cond = {"prompt_embeds": encode_text(model, [p]).to(model.device)}
        null_conds = [{"prompt_embeds": n.to(model.device)} for n in nulls]
        z_0 = ddim_sample(denoise, schedule, z_T[None], cond, null_conds, cfg.guidance_scale)[0]
        z0 = encode_latents(model, px[None].to(model.device))[0]
        out.append(BaselineResult(torch.cat(nulls).cpu(), z0.cpu(), z_T.cpu(), z_0.cpu(), torch.zeros(0)))
    return seconds, out


def run_engine(model, pixels, prompts, cfg, rows, runtime, fixed=False) -> tuple[float, dict, dict]:
    """Seconds per image, results by index, call counts."""
    adm = [Admission(k, px, p) for k, (px, p) in enumerate(zip(pixels, prompts))]
    groups = [adm[i : i + rows] for i in range(0, len(adm), rows)] if fixed else [adm]
    out, calls = {}, {"grad": 0, "no_grad": 0, "rows": 0}
    t0 = time.perf_counter()
    for group in groups:
        engine = SlotEngine(model, cfg, rows, runtime, slots=rows if fixed else None)
        for ev in engine.run(group):
            if isinstance(ev, Failed):
                raise RuntimeError(f"image {ev.tag} failed: {ev.error}")
            if isinstance(ev, Finished):
                out[ev.tag] = ev.inversion
        for k in calls:
            calls[k] += engine.calls[k]
    sync(model.device)
    return (time.perf_counter() - t0) / len(adm), out, calls


def check(engine_out: dict, base: list, args) -> dict:
    """Per image of the baseline: |Δ z*_T|, |Δ z̄_0| and both reconstruction errors ‖z̄_0 − z*_0‖²."""
    dz_T = max(float((engine_out[k].z_T - b.z_T).abs().max()) for k, b in enumerate(base))
    dz_0 = max(float((engine_out[k].z_0 - b.z_0).abs().max()) for k, b in enumerate(base))
    err_e = sum(float((engine_out[k].z_0 - b.pivot_z0).pow(2).mean()) for k, b in enumerate(base)) / len(base)
    err_b = sum(float((b.z_0 - b.pivot_z0).pow(2).mean()) for b in base) / len(base)
    ok = dz_T <= args.pivot_tol and dz_0 <= args.latent_tol
    return {"max_abs_dz_T": dz_T, "max_abs_dz_0": dz_0, "recon_mse_engine": err_e, "recon_mse_baseline": err_b,
            "passed": ok}  # fmt: skip


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Null-text inversion throughput ({report['model']}, T={report['T']}, N={report['N']})", "",
             f"Machine: {report['machine']}", "", f"Command: `{report['command']}`", "",
             "| early stop | method | rows | s/image | images/s | inner steps/image | × authors' own code | "
             "× as distributed | × frozen loop | UNet rows filled | equality |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for es, block in report["runs"].items():
        base = {"own": block.get("authors_own_code_s"), "dist": block["baseline_as_distributed_s"],
                "frozen": block["baseline_frozen_s"]}  # fmt: skip

        def ratios(s: float, shown: bool = True) -> str:
            return " | ".join("—" if b is None else (f"{b / s:.2f}" if shown else "not shown") for b in base.values())

        rows = [("authors' code as distributed", "as_distributed", base["dist"], "—"),
                ("authors' loop, frozen weights", "frozen", base["frozen"], "—")]  # fmt: skip
        if base["own"] is not None:
            eq = block["authors_own_vs_reimplementation"]
            verdict = f"{'passed' if eq['passed'] else 'FAILED'} (Δz̄_0 {eq['max_abs_dz_0']:.1e})"
            own_eq = f"vs re-implementation: {verdict}"
            rows.append(("**authors' own NullInversion**", "authors_own", base["own"], own_eq))

        def timed(key: str, sec: float) -> str:  # the median, and the range over --repeats rounds
            runs = block.get("seconds", {}).get(key, [])
            return f"{sec:.2f}" + (f" ({min(runs):.2f}–{max(runs):.2f})" if len(runs) > 1 else "")

        for name, key, sec, eq_text in rows:
            lines.append(f"| {es} | {name} | 1 | {timed(key, sec)} | {1 / sec:.3f} | — | {ratios(sec)} | 100% "
                         f"| {eq_text} |")  # fmt: skip
        for row in block["engine"]:
            eq, sec, calls = row["equality"], row["s_per_image"], row["calls"]
            fill = calls["rows"] / max(1, (calls["grad"] + calls["no_grad"]) * row["rows"])
            key = f"{row['method']} rows={row['rows']}"
            lines.append(f"| {es} | {row['method']} | {row['rows']} | {timed(key, sec)} | "
                         f"{1 / sec:.3f} | "
                         f"{row['inner_steps_per_image']:.0f} | {ratios(sec, eq['passed'])} | {fill:.0%} | "
                         f"{'passed' if eq['passed'] else 'FAILED'} (Δz̄_0 {eq['max_abs_dz_0']:.1e}) |")  # fmt: skip
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for es, block in report["runs"].items():
        for method in sorted({r["method"] for r in block["engine"]}):
            rows = [r for r in block["engine"] if r["method"] == method]
            ax.plot([r["rows"] for r in rows], [1 / r["s_per_image"] for r in rows], "o-", label=f"{method}, ES {es}")
        ax.axhline(1 / block["baseline_as_distributed_s"], ls="--", c="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows per UNet call (batch size)")
    ax.set_ylabel("images / s")
    ax.set_title("dashed: the authors' code as distributed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)


def run_block(args, model, runtime, pixels, prompts, cfg, batch_sizes) -> dict:
    """Steps 2–4 for one early-stop setting, ``--repeats`` rounds in turn (every configuration once per round, so a
    slow spell of the machine hits them alike); s/image is each configuration's median over the rounds."""
    nb, n = args.baseline_images, args.images
    seconds: dict[str, list[float]] = {}
    block: dict = {"engine": []}
    for round_ in range(args.repeats):
        dist_s, base = run_baseline(
            model, pixels[:nb], prompts[:nb], cfg, weights_grad=True, classic_attention=authors_attention
        )
        frozen_s, _ = run_baseline(model, pixels[:nb], prompts[:nb], cfg, weights_grad=False)  # 2
        seconds.setdefault("as_distributed", []).append(dist_s)
        seconds.setdefault("frozen", []).append(frozen_s)
        if args.authors_repo is not None:  # their own NullInversion class, checked against the re-implementation
            own_s, own = run_authors(model, pixels[:nb], prompts[:nb], cfg, args.authors_repo)
            seconds.setdefault("authors_own", []).append(own_s)
            block["authors_own_vs_reimplementation"] = check({k: b for k, b in enumerate(own)}, base, args)
        for rows in batch_sizes:  # 3
            for method in ("slots", "fixed batches") if args.fixed else ("slots",):
                sec, out, calls = run_engine(model, pixels[:n], prompts[:n], replace(cfg), rows, runtime,
                                             fixed=method != "slots")  # fmt: skip
                seconds.setdefault(f"{method} rows={rows}", []).append(sec)
                if round_ == 0:
                    block["engine"].append(
                        {
                            "method": method,
                            "rows": rows,
                            "equality": check(out, base, args),
                            "inner_steps_per_image": sum(int(i.inner_steps.sum()) for i in out.values()) / n,
                            "calls": calls,
                        }
                    )  # fmt: skip  4
        print(f"  round {round_ + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in seconds.items()),
              flush=True)  # fmt: skip
    median = {k: statistics.median(v) for k, v in seconds.items()}
    block.update(
        seconds=seconds, baseline_as_distributed_s=median["as_distributed"], baseline_frozen_s=median["frozen"]
    )
    if "authors_own" in median:
        block["authors_own_code_s"] = median["authors_own"]
    for row in block["engine"]:
        row["s_per_image"] = median[f"{row['method']} rows={row['rows']}"]
    return block


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_bench_model(args.model, device)  # 1
    runtime = Runtime()
    if args.precision != "32-true":
        import lightning as L

        runtime = Runtime(L.Fabric(accelerator=device.type, devices=1, precision=args.precision))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    pixels, prompts = images_for(args, model, max(args.images, args.baseline_images))
    report = {"model": args.model, "T": args.num_ddim_steps, "N": args.num_inner_steps, "machine": machine(),
              "command": "python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "images": args.images, "precision": args.precision, "runs": {}}  # fmt: skip
    warm = InversionConfig(num_ddim_steps=2, num_inner_steps=1, image_size=args.image_size)
    run_baseline(
        model, pixels[:1], prompts[:1], warm, weights_grad=True, classic_attention=authors_attention
    )  # warm-up
    run_engine(model, pixels[:1], prompts[:1], warm, 1, runtime)
    for es in ("on", "off") if args.early_stop == "both" else (args.early_stop,):
        cfg = InversionConfig(num_ddim_steps=args.num_ddim_steps, num_inner_steps=args.num_inner_steps,
                              early_stop=es == "on", image_size=args.image_size)  # fmt: skip
        block = run_block(args, model, runtime, pixels, prompts, cfg, batch_sizes)
        print(f"early stop {es}: {json.dumps(block['seconds'])}", flush=True)
        report["runs"][es] = block
    write_report(report, args.out)  # 5
    print(f"wrote {args.out}/bench.json, bench.md, throughput.png")
    return 0 if all(r["equality"]["passed"] for b in report["runs"].values() for r in b["engine"]) else 1


if __name__ == "__main__":
    sys.exit(main())
