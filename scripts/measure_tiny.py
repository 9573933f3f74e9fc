"""Measures the embedded tiny model on held-out photographs and writes the figures into docs/tiny_model.md.

1. VAE alone (encode → decode, posterior mean) at 128 px against Pillow's bicubic 8× shrink-and-enlarge
   (the same number of pixels the 16×16 latents have): PSNR against the photo, and the share of the photo's
   colour kept (chroma = mean |pixel − its grey|, grey = mean of R, G, B; ratio output / input).
2. The paper's effect through the package's public API (``nti_lightning.invert``,
   ``api.reconstruction_latents``, ``api.ddim_baseline_latents``): latent MSE against the pivot z*_0 of
   DDIM inversion replayed at w = 7.5 without NTI and of NTI at w = 7.5, and their ratio, plus PSNR of the
   decoded images against the VAE round trip.

The photographs (astronaut, chelsea, coffee from scikit-image; china, flower from scikit-learn) are square
centre crops resized bicubically to 128 px; none is used for training (``scripts/tiny_data.py``).

    python scripts/measure_tiny.py                                # print
    python scripts/measure_tiny.py --write docs/tiny_model.md     # and replace the measured block there
    python scripts/measure_tiny.py --model tiny-sd2-v --block sd2 --write docs/tiny_model.md   # the SD2-v model
    python scripts/measure_tiny.py --model tiny-sdxl --block sdxl --write docs/tiny_model.md   # the SDXL model

The model's family does the rest (SDXL: two text encoders, pooled embedding and time ids; NTI optimises the
null's prompt_embeds and text_embeds); the VAE is measured in its own latent units (scaling not applied).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_data as td  # noqa: E402

START, END = "<!-- measure_tiny:start -->", "<!-- measure_tiny:end -->"


def markers(block: str | None) -> tuple[str, str]:
    """The measured block's delimiters: the default one, or ``<!-- measure_tiny:NAME:start -->`` …"""
    return (START, END) if not block else (f"<!-- measure_tiny:{block}:start -->", f"<!-- measure_tiny:{block}:end -->")


@torch.no_grad()
def measure_vae(vae, size: int = 128) -> list[dict]:
    rows = []
    for name, x in td.eval_images(size):
        r = vae.decode(vae.encode(x[None]).latent_dist.mean).sample[0].clamp(-1, 1)
        b = td.bicubic_down_up(x, 8)
        c = td.chroma(x)
        rows.append(
            {
                "image": name,
                "vae_psnr": td.psnr(r, x),
                "bicubic_psnr": td.psnr(b, x),
                "vae_chroma": td.chroma(r) / c,
                "bicubic_chroma": td.chroma(b) / c,
            }
        )
    return rows


def measure_nti(model, steps: int) -> list[dict]:
    from nti_lightning import invert
    from nti_lightning.api import ddim_baseline_latents, reconstruction_latents
    from nti_lightning.engine.sampling import decode_latents

    photos = [
        (name, td.centre_crop(td.load_rgb(folder, name), 128), prompt) for folder, name, _, prompt in td.EVAL_PHOTOS
    ]
    invs = invert(
        model, [p for _, p, _ in photos], [c for *_, c in photos], num_ddim_steps=steps, batch_size=len(photos)
    )
    z0 = torch.stack([inv.pivot_z0 for inv in invs])
    nti = reconstruction_latents(model, invs)
    cfg = ddim_baseline_latents(model, invs, 7.5)
    w1 = ddim_baseline_latents(model, invs, 1.0)
    target, x_nti, x_cfg = (decode_latents(model, z) for z in (z0, nti, cfg))
    rows = []
    for k, (name, _, prompt) in enumerate(photos):
        mse = {n: (z[k] - z0[k]).pow(2).mean().item() for n, z in (("nti", nti), ("cfg", cfg), ("w1", w1))}
        rows.append(
            {
                "image": name,
                "prompt": prompt,
                "mse_ddim_w1": mse["w1"],
                "mse_ddim_cfg": mse["cfg"],
                "mse_nti": mse["nti"],
                "ratio": mse["cfg"] / mse["nti"],
                "psnr_ddim_cfg": td.psnr(x_cfg[k], target[k]),
                "psnr_nti": td.psnr(x_nti[k], target[k]),
            }
        )
    return rows


def markdown(vae_rows: list[dict], nti_rows: list[dict], steps: int, command: str, seconds: float) -> str:
    out = [f"Measured by `{command}` ({seconds:.0f} s).", ""]
    out += [
        "**VAE alone at 128 px** (encode → decode) vs Pillow bicubic 8× down-and-up; chroma kept = output's "
        "mean |pixel − grey| / the photo's.",
        "",
    ]
    out += [
        "| photo | VAE PSNR (dB) | bicubic 8× PSNR (dB) | VAE − bicubic | VAE chroma kept | bicubic chroma kept |",
        "|---|---|---|---|---|---|",
    ]
    for r in vae_rows:
        out.append(
            f"| {r['image']} | {r['vae_psnr']:.2f} | {r['bicubic_psnr']:.2f} | "
            f"{r['vae_psnr'] - r['bicubic_psnr']:+.2f} | {100 * r['vae_chroma']:.0f}% | {100 * r['bicubic_chroma']:.0f}% |"
        )
    m = {
        k: float(np.mean([r[k] for r in vae_rows]))
        for k in ("vae_psnr", "bicubic_psnr", "vae_chroma", "bicubic_chroma")
    }
    out.append(
        f"| **mean** | **{m['vae_psnr']:.2f}** | {m['bicubic_psnr']:.2f} | **{m['vae_psnr'] - m['bicubic_psnr']:+.2f}** | "
        f"**{100 * m['vae_chroma']:.0f}%** | {100 * m['bicubic_chroma']:.0f}% |"
    )
    if nti_rows:
        out += [
            "",
            f"**The paper's effect at T = {steps}** (package API, paper hyperparameters N = 10, w = 7.5): latent "
            "MSE against the pivot z*_0; PSNR of the decoded image against the VAE round trip.",
            "",
        ]
        out += [
            "| photo | prompt | DDIM w = 1 MSE | DDIM + CFG 7.5 MSE | NTI MSE | ratio CFG / NTI | DDIM + CFG PSNR | NTI PSNR |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in nti_rows:
            out.append(
                f"| {r['image']} | {r['prompt']} | {r['mse_ddim_w1']:.2e} | {r['mse_ddim_cfg']:.2e} | {r['mse_nti']:.2e} | "
                f"{r['ratio']:.0f}× | {r['psnr_ddim_cfg']:.1f} | {r['psnr_nti']:.1f} |"
            )
        ratios = [r["ratio"] for r in nti_rows]
        out.append(f"| **min / mean** | | | | | **{min(ratios):.0f}× / {np.mean(ratios):.0f}×** | | |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help='"tiny" (the embedded model) or a diffusers folder')
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps T for the NTI check")
    parser.add_argument("--vae-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", type=Path, help="markdown file whose measured block to replace")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--block", help="name of the measured block to replace (default: the unnamed one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nti_lightning import load_model

    start = time.time()
    model = load_model(args.model)
    vae_rows = measure_vae(model.vae)
    nti_rows = [] if args.vae_only else measure_nti(model, args.steps)
    seconds = time.time() - start
    command = "python scripts/measure_tiny.py" + (f" --model {args.model}" if args.model != "tiny" else "")
    command += f" --block {args.block}" if args.block else ""
    command += (f" --steps {args.steps}" if args.steps != 20 else "") + (" --vae-only" if args.vae_only else "")
    if args.write:
        command += f" --write {args.write}"
    text = markdown(vae_rows, nti_rows, args.steps, command, seconds)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"vae": vae_rows, "nti": nti_rows, "seconds": seconds}, indent=1))
    if args.write:
        start, end = markers(args.block)
        doc = args.write.read_text()
        if start not in doc or end not in doc:
            raise SystemExit(f"{args.write} has no {start} … {end} block")
        head, rest = doc.split(start, 1)
        args.write.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
