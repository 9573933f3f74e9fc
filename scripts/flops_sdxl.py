"""Counts the cost of Null-text Inversion on an SDXL-shaped UNet at 1024 px and writes it to docs/performance.md.

The UNet (``nti_bench.sdxl.SDXL_UNET_CONFIG``, SDXL base 1.0's 2.57 B parameters) is built on the
``meta`` device: no weights are allocated, the count takes ~1 min of CPU. ``FlopCounterMode`` counts one
forward and one forward + backward to the unconditional branch's inputs (prompt_embeds (B, 77, 2048) and the
pooled text_embeds (B, 1280), the two NTI optimises; weights frozen, so no weight gradients) at 128 × 128
latents, batch 2 (the CFG pair [∅, C]) and reported per image; autograd's saved tensors give an upper bound
on the activation memory of one inner step.

Worst case per image (Algorithm 1 of Mokady et al. 2023, every timestep runs all N inner steps; the engine's
calls, ``bench.flops.floor_flops``): T pivot forwards (DDIM inversion, w = 1) + T conditional forwards + T·N
forward+backward passes of the unconditional branch + T unconditional forwards for z̄_{t−1}.

    python scripts/flops_sdxl.py                              # print
    python scripts/flops_sdxl.py --write docs/performance.md  # and replace the block there
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nti_bench.flops import count_unet_flops, floor_flops, meta_unet, saved_activation_bytes
from nti_bench.sdxl import SDXL_IMAGE_SIZE, SDXL_UNET_CONFIG

START, END = "<!-- flops_sdxl:start -->", "<!-- flops_sdxl:end -->"


def measure(steps: int, inner: int, batch: int) -> dict:
    start = time.time()
    unet, _ = meta_unet(SDXL_UNET_CONFIG)
    params = sum(p.numel() for p in unet.parameters())
    latent = SDXL_UNET_CONFIG["sample_size"]
    flops = count_unet_flops(SDXL_UNET_CONFIG, latent_size=latent, batch_size=batch, dtype=torch.bfloat16)
    saved = saved_activation_bytes(SDXL_UNET_CONFIG, latent, batch_size=1, dtype=torch.bfloat16)
    worst = floor_flops(flops, steps, inner)
    return {
        "parameters": params,
        "latent_size": latent,
        "batch": batch,
        **flops.to_dict(),
        "saved_activations_bf16_bytes_per_image": saved,
        "weights_bf16_bytes": 2 * params,
        "steps": steps,
        "inner_steps": inner,
        "worst_case_flops_per_image": worst,
        "seconds": time.time() - start,
    }


def markdown(r: dict, command: str) -> str:
    tf = 1e12
    worst = r["worst_case_flops_per_image"]
    return "\n".join(
        [
            f"Counted by `{command}` ({r['seconds']:.0f} s on a CPU, UNet on the meta device, no weights).",
            "",
            "| SDXL-shaped UNet | value |",
            "|---|---|",
            f"| parameters | {r['parameters'] / 1e9:.3f} B ({r['weights_bf16_bytes'] / 2**30:.1f} GiB in bf16) |",
            f"| resolution | {SDXL_IMAGE_SIZE} px ({r['latent_size']}² latents), counted at batch {r['batch']} "
            "(the CFG pair), per image |",
            f"| forward | {r['forward'] / tf:.2f} TFLOP |",
            f"| backward to prompt_embeds + text_embeds | {r['backward'] / tf:.2f} TFLOP |",
            f"| forward + backward (one inner step) | {r['forward_backward'] / tf:.2f} TFLOP |",
            f"| a CFG step [∅, C] (2 forwards) | {2 * r['forward'] / tf:.2f} TFLOP |",
            f"| saved for backward, one image, bf16 (upper bound, classic attention) | "
            f"{r['saved_activations_bf16_bytes_per_image'] / 2**30:.1f} GiB |",
            f"| **worst case per image** (T = {r['steps']}, N = {r['inner_steps']}: "
            "3T forwards + T·N forward+backward) | "
            f"**{worst / 1e15:.2f} PFLOP** → {worst / 800e12:.1f} s at 800 TFLOP/s |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="T")
    parser.add_argument("--inner-steps", type=int, default=10, help="N")
    parser.add_argument("--batch", type=int, default=2, help="batch counted (2: the CFG pair); reported per image")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", type=Path, help="markdown file whose flops_sdxl block to replace")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.steps, args.inner_steps, args.batch)
    command = "python scripts/flops_sdxl.py" + (f" --write {args.write}" if args.write else "")
    text = markdown(result, command)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.write:
        doc = args.write.read_text()
        if START not in doc or END not in doc:
            raise SystemExit(f"{args.write} has no {START} … {END} block")
        head, rest = doc.split(START, 1)
        args.write.write_text(head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
