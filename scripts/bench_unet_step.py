"""Micro-benchmark of the inner step's cost: one UNet forward + backward to the null (text) embeddings, the
operation Algorithm 1 repeats N·T times per image, under each UNet option the performance issue lists.

    python scripts/bench_unet_step.py --model tiny --batch-sizes 1,4,8 --threads 1 --out benchmarks/cpu-tiny-step
    python scripts/bench_unet_step.py --model sd15 --batch-sizes 8 --variants eager,channels_last,bf16,compile
    python scripts/bench_unet_step.py --model sdxl --batch-sizes 1,2,4 --variants eager,bf16,compile   # CUDA only

Models: ``tiny``, ``sd15`` (SD1.5's shape, random weights), ``tiny-sdxl`` (the embedded SDXL-shaped toy) and
``sdxl`` (SDXL base's UNet shape, ``bench.sdxl.SDXL_UNET_CONFIG``, 2.57 B random parameters at 1024 px: a CUDA
GPU only). For SDXL UNets the backward reaches the pooled ``text_embeds`` too (NTI optimises both).

Variants: ``eager`` (fp32, SDPA), ``channels_last``, ``bf16`` (autocast; fp16 on CUDA would time the same
kernels), ``compile`` (``torch.compile``, default mode; its compile time is reported separately),
``compile-graphs`` (``mode="reduce-overhead"``: CUDA graphs, CUDA only). Each variant is timed over
``--iters`` steps after ``--warmup`` steps, interleaved round-robin ``--rounds`` times so a noisy neighbour
hits every variant alike; the median is reported. Writes ``step.json`` and ``step.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

from nti_bench import build_bench_model

VARIANTS = ("eager", "channels_last", "bf16", "compile", "compile-graphs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("tiny", "sd15", "tiny-sdxl", "sdxl"), default="tiny")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--variants", default="eager,channels_last,bf16,compile")
    p.add_argument("--iters", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench-step"))
    args = p.parse_args(argv)
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {VARIANTS}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step_model(name: str, device: torch.device):
    """What to time: an ``NTIModel`` (tiny, sd15, tiny-sdxl) or, for ``sdxl``, SDXL base's UNet alone with
    seeded random weights (the text encoders and VAE play no part in an inner step)."""
    if name == "tiny-sdxl":
        from nti_lightning.models import load_model

        return load_model("tiny-sdxl", device=device)
    if name != "sdxl":
        return build_bench_model(name, device)
    if device.type != "cuda":
        raise SystemExit("--model sdxl needs a CUDA GPU (2.57 B parameters: 10 GB in fp32); use --model tiny-sdxl")
    from diffusers import UNet2DConditionModel

    from nti_bench.sdxl import SDXL_UNET_CONFIG

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    return SimpleNamespace(unet=unet.requires_grad_(False).eval(), device=device)


def null_inputs(unet, B: int, device: torch.device) -> tuple[list[torch.Tensor], dict]:
    """The null conditioning NTI optimises, with grad, and the UNet's keyword arguments: encoder_hidden_states
    (B, 77, D); SDXL (``text_time``) also the pooled text_embeds (B, D₂) and the time ids (B, 6)."""
    config = unet.config
    null = torch.randn(B, 77, config.cross_attention_dim, device=device, requires_grad=True)  # (B, L, D)
    kwargs = {"encoder_hidden_states": null}
    if config.get("addition_embed_type") != "text_time":
        return [null], kwargs
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    pooled = torch.randn(B, pooled_dim, device=device, requires_grad=True)  # (B, D₂)
    size = float(config.sample_size * 8)
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]] * B, device=device)  # (B, 6)
    kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return [null, pooled], kwargs


def make_step(model, variant: str, B: int):
    """(step(), compile_seconds): one forward + backward to the null embeddings of a batch of B."""
    unet, device = model.unet, model.device
    h = unet.config.sample_size  # the latent size the UNet was built for (64 for SD1.5 at 512 px)
    z = torch.randn(B, unet.config.in_channels, h, h, device=device)  # (B, 4, h, w)
    t = torch.tensor(501, device=device)
    leaves, kwargs = null_inputs(unet, B, device)
    if variant == "channels_last":  # a copy, so the other variants keep the default layout
        unet = copy.deepcopy(unet).to(memory_format=torch.channels_last)
        z = z.contiguous(memory_format=torch.channels_last)
    if variant.startswith("compile"):
        unet = torch.compile(unet, mode="reduce-overhead" if variant == "compile-graphs" else "default")
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if variant == "bf16" else nullcontext()

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        with cast:
            eps = unet(z, t, **kwargs).sample
        eps.float().square().mean().backward()

    t0 = time.perf_counter()
    step()  # the first call compiles
    sync(device)
    return step, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_step_model(args.model, device)
    rows = []
    for B in args.batch_sizes:
        steps, first = {}, {}
        for v in args.variants:
            if v == "compile-graphs" and device.type != "cuda":
                continue
            steps[v], first[v] = make_step(model, v, B)
            for _ in range(args.warmup):
                steps[v]()
        times: dict[str, list[float]] = {v: [] for v in steps}
        for _ in range(args.rounds):
            for v, step in steps.items():
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    step()
                sync(device)
                times[v].append((time.perf_counter() - t0) / args.iters)
        eager = statistics.median(times["eager"]) if "eager" in times else None
        for v, ts in times.items():
            ms = 1000 * statistics.median(ts)
            row = {"batch_size": B, "variant": v, "ms_per_step": ms, "ms_per_image_step": ms / B,
                   "rounds_ms": [1000 * x for x in ts], "first_call_s": first[v],
                   "speedup_vs_eager": eager / statistics.median(ts) if eager else None}  # fmt: skip
            rows.append(row)
            print(f"B={B} {v:<15} {ms:9.1f} ms/step ({ms / B:7.1f} ms/image)  first call {first[v]:6.1f} s  "
                  f"rounds {[round(1000 * x, 1) for x in ts]}", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    header = (f"UNet forward + backward to the null embeddings, model {args.model}, {machine}, torch "
              f"{torch.__version__}, {torch.get_num_threads()} CPU threads; median of {args.rounds} interleaved "
              f"rounds of {args.iters} steps")  # fmt: skip
    lines = [header, "", "| batch | variant | ms / step | ms / image | vs eager | first call (s) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['variant']} | {r['ms_per_step']:.1f} | {r['ms_per_image_step']:.1f} | "
                     f"{r['speedup_vs_eager']:.2f}× | {r['first_call_s']:.1f} |")  # fmt: skip
    (args.out / "step.md").write_text("\n".join(lines) + "\n")
    (args.out / "step.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
