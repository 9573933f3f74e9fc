"""The demo figure ``docs/demo_strips.png``: one labelled row per shipped sample of the embedded tiny model.

Columns: source | VAE round trip | DDIM inversion replayed with w = 7.5 (no NTI, the failure the paper fixes) |
Null-text Inversion (Mokady et al. 2023, Algorithm 1) | a Prompt-to-Prompt edit of the NTI inversion
(Hertz et al. 2022). Paper hyperparameters (T = 50, N = 10, w = 7.5), at the model's native 128 px.

    python scripts/make_demo_strip.py                       # → docs/demo_strips.png, PSNRs on stdout
    python scripts/make_demo_strip.py --model tiny-sd2-v --out /tmp/sd2_strips.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from nti_lightning import edit, invert, load_model
from nti_lightning.api import ddim_baseline_latents, reconstruction_latents
from nti_lightning.data.image import prepare_image, tensor_to_image
from nti_lightning.data.items import SAMPLES_DIR
from nti_lightning.engine.sampling import decode_latents
from nti_lightning.metrics import image_metrics
from nti_lightning.p2p.figures import labelled_strip

EDITS = {  # shipped sample → a word-swap target prompt (same number of words: P2P "replace")
    "cat.png": "a photo of a dog",
    "coffee.png": "a cup of tea on a table",
    "astronaut.png": "a photo of a woman",
}
ROW_GAP = 6


def rows_of_samples() -> list[tuple[str, str]]:
    lines = (SAMPLES_DIR / "captions.jsonl").read_text().splitlines()
    return [(r["image"], r["prompt"]) for r in map(json.loads, lines)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", type=Path, default=Path("docs/demo_strips.png"))
    parser.add_argument("--steps", type=int, default=50, help="T, DDIM steps (the paper's 50)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    model = load_model(args.model)
    size = model.native_image_size
    samples = rows_of_samples()
    paths = [str(SAMPLES_DIR / name) for name, _ in samples]
    inversions = invert(model, paths, [p for _, p in samples], num_ddim_steps=args.steps, batch_size=len(paths))
    with torch.no_grad():
        x = torch.stack([prepare_image(p, size) for p in paths]).to(model.device)  # (B, 3, H, W) in [-1, 1]
        vae = decode_latents(model, torch.stack([inv.pivot_z0 for inv in inversions]).to(model.device))
        no_nti = decode_latents(model, ddim_baseline_latents(model, inversions, 7.5))
        nti = decode_latents(model, reconstruction_latents(model, inversions))
    strips = []
    for k, (name, prompt) in enumerate(samples):
        target = EDITS.get(name, prompt)
        edited = edit(model, inversions[k], target).images[1]
        scores = {
            "VAE vs source": image_metrics(vae[k], x[k])["psnr"],
            "no NTI vs VAE": image_metrics(no_nti[k], vae[k])["psnr"],
            "NTI vs VAE": image_metrics(nti[k], vae[k])["psnr"],
        }
        print(f"{name}: " + ", ".join(f"{key} {v:.1f} dB" for key, v in scores.items()), flush=True)
        tiles = [tensor_to_image(t) for t in (x[k], vae[k], no_nti[k], nti[k])] + [edited]
        labels = [
            f"source: {prompt}",
            f"VAE round trip ({scores['VAE vs source']:.1f} dB)",
            f"w=7.5, no NTI ({scores['no NTI vs VAE']:.1f} dB)",
            f"NTI ({scores['NTI vs VAE']:.1f} dB)",
            f"P2P edit: {target}",
        ]
        strips.append(labelled_strip(tiles, labels))
    width = max(s.width for s in strips)
    figure = Image.new("RGB", (width, sum(s.height for s in strips) + ROW_GAP * (len(strips) - 1)), "white")
    y = 0
    for s in strips:
        figure.paste(s, (0, y))
        y += s.height + ROW_GAP
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out)
    print(f"wrote {args.out} ({figure.width}×{figure.height}) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
