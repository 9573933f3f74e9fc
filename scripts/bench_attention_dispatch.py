"""What the direct attention dispatch (``models/attention_dispatch.py``) saves: diffusers' ``Attention.forward``
against the direct forward, on SD1.5's UNet shape at 512 px (random weights) and on the embedded tiny model.

    python scripts/bench_attention_dispatch.py --out benchmarks/results/attention-dispatch-cpu

Two measurements per model, each interleaved round-robin (stock, direct, stock, …) so a noisy neighbour hits
both alike, medians reported:

- the whole step: one UNet forward + backward to the null embeddings at batch 1 (the inner step of Algorithm 1),
  ``--rounds`` times after one warm-up each;
- the dispatch alone: ``--calls`` calls of one attention module on a 1-token input (the layer's arithmetic is then
  negligible, so the difference is the host time of the dispatch), times the UNet's number of attention calls.

Writes ``dispatch.json`` and ``dispatch.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from nti_lightning.models.attention_dispatch import (
    _attention_modules,
    direct_attention_dispatch,
    stock_attention_dispatch,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="sd15,tiny", help="sd15 (SD1.5's UNet at 512 px, random) and/or tiny")
    p.add_argument("--rounds", type=int, default=5, help="timed whole steps per dispatch")
    p.add_argument("--calls", type=int, default=20000, help="attention calls per dispatch for the overhead")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench-dispatch"))
    return p.parse_args(argv)


def build_unet(name: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    if name == "tiny":
        from nti_lightning.models import load_model

        return load_model("tiny").unet
    from nti_bench.sd15 import SD15_UNET_CONFIG

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).requires_grad_(False).eval()
    direct_attention_dispatch(unet)  # as load_model does
    return unet


def make_step(unet):
    """One inner step at batch 1: the UNet forward at the latent size it was built for + backward to ∅."""
    g = torch.Generator().manual_seed(0)
    h = unet.config.sample_size
    z = torch.randn(1, unet.config.in_channels, h, h, generator=g)  # (1, 4, h, w)
    null = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g, requires_grad=True)  # (1, 77, D)
    t = torch.tensor(501)

    def step() -> None:
        null.grad = None
        unet(z, t, encoder_hidden_states=null).sample.square().mean().backward()

    return step


def timed(fn, repeat: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def interleaved(unet, fn, rounds: int, repeat: int = 1) -> dict[str, float]:
    """Median seconds of ``fn`` under diffusers' forward and the direct one, alternating, after a warm-up each."""
    times = {"stock": [], "direct": []}
    with stock_attention_dispatch(unet):
        fn()
    fn()
    for _ in range(rounds):
        with stock_attention_dispatch(unet):
            times["stock"].append(timed(fn, repeat))
        times["direct"].append(timed(fn, repeat))
    return {k: statistics.median(v) for k, v in times.items()}


def dispatch_overhead(unet, calls: int) -> dict[str, float]:
    """Seconds per attention call of the dispatch alone: one module, a 1-token input, no grad."""
    attn = _attention_modules(unet)[0]
    x = torch.randn(1, 1, attn.to_q.in_features)

    def many() -> None:
        with torch.no_grad():
            for _ in range(calls):
                attn(x)

    per = interleaved(unet, many, rounds=5)
    return {k: v / calls for k, v in per.items()}


def attention_calls(unet) -> int:
    """Attention module calls in one UNet forward (each module runs once)."""
    return len(_attention_modules(unet))


def measure(name: str, rounds: int, calls: int) -> dict:
    unet = build_unet(name)
    step = interleaved(unet, make_step(unet), rounds)
    overhead = dispatch_overhead(unet, calls)
    n = attention_calls(unet)
    saved_per_call = overhead["stock"] - overhead["direct"]
    return {
        "model": name,
        "latent": unet.config.sample_size,
        "attention_calls_per_forward": n,
        "step_s": step,
        "step_saving_pct": 100 * (step["stock"] - step["direct"]) / step["stock"],
        "dispatch_us": {k: 1e6 * v for k, v in overhead.items()},
        "dispatch_saving_per_forward_ms": 1e3 * n * saved_per_call,
        "dispatch_saving_pct_of_step": 100 * n * saved_per_call / step["stock"],
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Direct attention dispatch: what it saves ({meta['device']}, {meta['threads']} threads)",
        "",
        f"`{meta['command']}`; torch {meta['torch']}, diffusers {meta['diffusers']}, medians of {meta['rounds']} "
        "interleaved rounds. Step: UNet forward + backward to ∅ at batch 1. Dispatch: one attention call on a "
        "1-token input.",
        "",
        "| model | latent | attention calls / forward | step, stock (s) | step, direct (s) | step saving | "
        "dispatch stock / direct (µs) | dispatch saving / forward (ms) | as % of the step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["dispatch_us"]
        lines.append(
            f"| {r['model']} | {r['latent']}×{r['latent']} | {r['attention_calls_per_forward']} | "
            f"{r['step_s']['stock']:.4f} | {r['step_s']['direct']:.4f} | {r['step_saving_pct']:.2f}% | "
            f"{d['stock']:.1f} / {d['direct']:.1f} | {r['dispatch_saving_per_forward_ms']:.3f} | "
            f"{r['dispatch_saving_pct_of_step']:.3f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import sys

    import diffusers

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(name.strip(), args.rounds, args.calls) for name in args.models.split(",") if name.strip()]
    meta = {
        "command": "python " + " ".join(["scripts/bench_attention_dispatch.py", *(argv or sys.argv[1:])]),
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "rounds": args.rounds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dispatch.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / "dispatch.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
