"""GPU sweep of the slot engine on an SD1.5-shaped model (random weights, 512 px), in one run of < 8 minutes.

    bash scripts/gpu_sweep.sh --out "$OUT/sweep.json"                    # on the GPU machine (wheels carried)
    python scripts/gpu_sweep.py --out benchmarks/results/gpu-sd15/sweep.json --budget-s 480
    python scripts/gpu_sweep.py --quick --threads 1 --out /tmp/sweep/sweep.json   # CPU smoke test, tiny model

What it measures, in this order (each step skipped, and the skip recorded, once ``--budget-s`` would be
exceeded; the JSON is rewritten after every step, so a run killed at its limit still leaves its numbers):

1. **CPU-vs-GPU agreement** on the embedded tiny model: the same photos inverted by the slot engine in fp32
   on the CPU and on the GPU (TF32 off), T = 50, N = 10: the pivot z*_T within ``--pivot-tol`` (1e-4) and
   each image's reconstruction PSNR (decode(z̄_0) against the input) within ``--psnr-tol-db`` (0.1 dB).
2. **Per batch size** (1, 2, 4, …, 64; the first out-of-memory batch size is recorded and the larger ones
   skipped), per precision (32-true and ``MIXED`` = 16-mixed, what ``trainer.precision=auto`` resolves to on a CUDA GPU:
   the package's ``Runtime`` over a Lightning Fabric) and with
   ``torch.compile`` off and on (the package's ``model.compile``: ``torch.compile(unet, mode)`` and a padded
   engine; compile time reported separately, per batch size, after ``torch._dynamo.reset()``): the seconds of
   one full call of each of the engine's two kinds — ``SlotEngine._run_grad`` (INNER rows: forward, backward to
   ∅_t, the per-row Adam step, the host sync) and ``SlotEngine._run_no_grad`` (PIVOT, COND and ADVANCE rows
   mixed) — and the admission of one image (VAE encode + text encoder), with the peak memory
   (``torch.cuda.max_memory_allocated``, reset per configuration; weights and the engine's slot bank included).
3. **Validation** of the extrapolation below, once: a full T = 50 run of the engine (``MIXED``, batch 8,
   early stop off, ``--validate-images`` images) timed end to end against the prediction from step 2.
4. **The authors' early stop**: one full T = 50 run with early stop on (same setting) gives the inner steps
   per image; with random weights that rate is *not* a real model's (the note is in the JSON).

**Extrapolation.** Continuous batching keeps every UNet call full (2·B − 1 slots, pigeonhole), so an image's
cost is its share of full calls. Per image the engine runs exactly T PIVOT + T COND + T ADVANCE rows without
grad and G INNER rows with grad (G = T·N worst case, early_stop=False; G = the measured Σ_t n_t with early
stop), so with t_ng, t_g the seconds of one full no-grad / grad call of B rows and a the admission per image::

    s/image = a + (3·T·t_ng + G·t_g) / B

Each call time is the mean of ``--timed-calls`` calls after ``--warmup-calls`` warm-up calls (the first call
of a compiled UNet is its compile). Not included: the stream's tail (calls less than full for the last
images of a dataset) and the decode/metrics/writes of ``nti invert``, which run beside the optimisation.

**Targets** (issue #10): ≤ 3 s/image worst case, ≥ 1,200 images/hour (worst case), a batch size ≥ 8 whose
peak memory fits in 80 GB (80·10⁹ bytes). Each is reported with the configuration that meets it (or the
best one) and ``met`` true/false (null when nothing was measured).

**On the GPU machine** (its image has torch with CUDA, lightning, transformers, torchmetrics, safetensors,
PyYAML; not diffusers, omegaconf nor diffusers' importlib_metadata): carry those three as wheels in the
git-ignored folder ``.whl`` (``echo /.whl/ >> .git/info/exclude`` once), fetched where pip can reach an index::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 omegaconf==2.4.0 importlib_metadata

(all three are pure-Python wheels), then run with ``carry: [".whl"]``: ``bash scripts/gpu_sweep.sh --out
"$OUT/sweep.json"``, which installs them into /tmp/site, puts the checkout on PYTHONPATH and runs this script
under ``timeout 570`` with ``--budget-s 480``.

``--family`` picks the model's builder from ``FAMILIES``: ``sd15`` (SD1.5's shapes, 512 px) or ``sdxl``
(SDXL base's shapes, ``bench.sdxl.build_sdxl_model``, 1024 px; its ≈8.15 PFLOP worst case per image is ≈8.5×
SD1.5's, so within the 8-minute budget expect the mixed mode at few batch sizes). The targets (≤ 3 s/image, …) are
SD1.5's; the JSON's ``targets.family`` says which family they were computed for. ``--quick`` runs every step on
the CPU with the tiny model, 64 px, T = 4, N = 2, batch sizes 1 and 2, no compile, in well under 2 minutes:
a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from nti_bench import build_bench_model, prompts_for, synthetic_images
from nti_lightning.config import InversionConfig
from nti_lightning.data.image import prepare_image
from nti_lightning.data.items import SAMPLES_DIR
from nti_lightning.engine.algorithm import Kind, Request
from nti_lightning.engine.runtime import Runtime
from nti_lightning.engine.sampling import decode_latents
from nti_lightning.engine.slots import Admission, Failed, Finished, SlotEngine
from nti_lightning.metrics import image_metrics

# the model builders by family: name → (bench model name, image size at the native resolution)
FAMILIES: dict[str, tuple[str, int]] = {"sd15": ("sd15", 512), "sdxl": ("sdxl", 1024)}
TARGETS = {"max_s_per_image_worst": 3.0, "min_images_per_hour": 1200.0, "min_batch_in_80gb": 8}
MEMORY_80GB = 80e9
PEAK_TFLOPS = 800.0  # the dense bf16 figure for an H100 (the FLOP floor ≈ 1.2 s/image)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # Lightning's names, as trainer.precision
MIXED = "16-mixed"  # runtime.resolve_precision("auto") on a CUDA GPU: the mixed mode the sweep times and validates
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")  # model.compile's values
EARLY_STOP_NOTE = (
    "random weights: the early-stop rate (inner steps per image) is not that of a trained model; "
    "the worst case (early_stop=False) is the number that transfers"
)


@dataclass(frozen=True)
class Setting:
    """What one run sweeps: the model, its size, the schedule, the grid."""

    model: str
    image_size: int
    T: int
    N: int
    batch_sizes: tuple[int, ...]
    precisions: tuple[str, ...]
    compile_modes: tuple[str, ...]  # "none" first; then the modes torch.compile is tried with
    compile_batch_sizes: tuple[int, ...]
    warmup_calls: int  # per call kind and configuration, untimed (the first one compiles a compiled UNet)
    timed_calls: int
    validate_batch: int
    validate_images: int
    agree_T: int
    agree_N: int
    agree_images: int
    agree_size: int


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="sd15", help=f"model family: {', '.join(FAMILIES)}")
    p.add_argument("--device", default=None, help="default: cuda (an error without one, unless --quick)")
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, tiny sizes: a smoke test (< 2 min)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget, warm-up included")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--precisions", default=f"{MIXED},32-true")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="none: no compiled runs")
    p.add_argument("--compile-batch-sizes", default="8,16,32,64,4,2,1", help="in the order they are tried")
    p.add_argument("--num-ddim-steps", type=int, default=50)
    p.add_argument("--num-inner-steps", type=int, default=10)
    p.add_argument("--warmup-calls", type=int, default=2)
    p.add_argument("--timed-calls", type=int, default=4)
    p.add_argument("--validate-batch", type=int, default=8)
    p.add_argument("--validate-images", type=int, default=8)
    p.add_argument("--agree-images", type=int, default=2)
    p.add_argument("--pivot-tol", type=float, default=1e-4, help="max |Δ z*_T|, CPU vs GPU, fp32")
    p.add_argument("--psnr-tol-db", type=float, default=0.1, help="max |Δ PSNR| per image, CPU vs GPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu-sweep/sweep.json"))
    args = p.parse_args(argv)
    if args.family not in FAMILIES:
        p.error(f"--family {args.family!r} is not known yet; this script knows: {', '.join(FAMILIES)}")
    bad = [x for x in args.precisions.split(",") if x not in PRECISIONS]
    if bad:
        p.error(f"--precisions: unknown {', '.join(bad)}; use a comma-separated subset of {', '.join(PRECISIONS)}")
    if min(args.warmup_calls, args.timed_calls - 1, args.validate_batch - 1, args.validate_images - 1) < 0:
        p.error("--timed-calls, --validate-batch and --validate-images must be >= 1, --warmup-calls >= 0")
    try:
        args.batch_sizes = _ints(args.batch_sizes)
        args.compile_batch_sizes = _ints(args.compile_batch_sizes)
    except ValueError as e:
        p.error(str(e))
    return args


def _ints(text: str) -> tuple[int, ...]:
    values = tuple(int(x) for x in text.split(",") if x.strip())
    if not values or min(values) < 1:
        raise ValueError(f"batch sizes must be positive integers, comma-separated; got {text!r}")
    return values


def setting_for(args) -> Setting:
    if args.quick:
        return Setting(
            model="tiny",
            image_size=64,
            T=4,
            N=2,
            batch_sizes=(1, 2),
            precisions=("32-true", "bf16-mixed"),  # CPU smoke: fp16's loss-scale skips would re-run steps
            compile_modes=("none",),
            compile_batch_sizes=(),
            warmup_calls=1,
            timed_calls=1,
            validate_batch=2,
            validate_images=2,
            agree_T=3,
            agree_N=2,
            agree_images=1,
            agree_size=64,
        )
    model, size = FAMILIES[args.family]
    T, N = args.num_ddim_steps, args.num_inner_steps
    return Setting(
        model=model,
        image_size=size,
        T=T,
        N=N,
        batch_sizes=args.batch_sizes,
        precisions=tuple(args.precisions.split(",")),
        compile_modes=("none",) if args.compile_mode == "none" else ("none", args.compile_mode),
        compile_batch_sizes=args.compile_batch_sizes,
        warmup_calls=args.warmup_calls,
        timed_calls=args.timed_calls,
        validate_batch=args.validate_batch,
        validate_images=args.validate_images,
        agree_T=T,
        agree_N=N,
        agree_images=args.agree_images,
        agree_size=128,
    )


def resolve_device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    if args.quick:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_sweep: no CUDA device here; run it on a GPU, or pass --quick for a CPU smoke test")
    return torch.device("cuda")


# ---------------------------------------------------------------------------------------------------------
# Time and memory
# ---------------------------------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s <= self.seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def machine(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info.update(
            gpu=prop.name,
            gpu_memory_bytes=int(prop.total_memory),
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def runtime_for(precision: str, device: torch.device) -> Runtime:
    if precision == "32-true":
        return Runtime()
    import lightning as L

    from nti_lightning.engine.runtime import precision_plugins

    kwargs = precision_plugins(precision, device.type)
    return Runtime(L.Fabric(accelerator=device.type, devices=1, **kwargs))


# ---------------------------------------------------------------------------------------------------------
# One configuration: the two kinds of full call, timed
# ---------------------------------------------------------------------------------------------------------


def admissions(n: int, size: int, seed: int = 0) -> list[Admission]:
    pixels = synthetic_images(min(n, 8), size, seed)
    prompts = prompts_for(n)
    return [Admission(k, pixels[k % len(pixels)], prompts[k]) for k in range(n)]


def fill_slots(engine: SlotEngine, rows: int, size: int) -> float:
    """Admits ``rows`` images (VAE encode + text encoder each); returns the seconds per image, timed after one
    untimed admission (first-call costs: kernel selection, allocator growth)."""
    batch = admissions(rows, size)
    engine._admit(0, batch[0])
    sync(engine.model.device)
    t0 = time.perf_counter()
    for s, adm in enumerate(batch):
        failure = engine._admit(s, adm)
        if failure is not None:
            raise RuntimeError(f"admission failed: {failure.error}")
    sync(engine.model.device)
    return (time.perf_counter() - t0) / rows


def set_requests(engine: SlotEngine, rows: int, grad: bool) -> None:
    """Every slot's next request: INNER at the middle timestep, or PIVOT / COND / ADVANCE in turn."""
    i = engine.cfg.num_ddim_steps // 2
    kinds = (Kind.PIVOT, Kind.COND, Kind.ADVANCE)
    for s in range(rows):
        kind = Kind.INNER if grad else kinds[s % 3]
        engine.slots[s].request = Request(kind, i, engine.cfg.learning_rate)


def time_calls(engine: SlotEngine, rows: int, grad: bool, warmup: int, timed: int) -> tuple[float, float]:
    """(seconds of the first call, mean seconds of ``timed`` calls after ``warmup``) of one full call kind."""
    call = engine._run_grad if grad else engine._run_no_grad
    device = engine.model.device
    durations = []
    for _ in range(warmup + timed):
        set_requests(engine, rows, grad)
        sync(device)
        t0 = time.perf_counter()
        call(list(range(rows)))
        sync(device)
        durations.append(time.perf_counter() - t0)
    return durations[0], sum(durations[warmup:]) / timed


def per_image(admit_s: float, t_ng: float, t_g: float, rows: int, T: int, grad_rows: float) -> float:
    """The extrapolation: s/image = a + (3·T·t_ng + G·t_g) / B (module docstring)."""
    return admit_s + (3 * T * t_ng + grad_rows * t_g) / rows


def measure_config(model, st: Setting, precision: str, mode: str, rows: int) -> dict:
    device = model.device
    cfg = InversionConfig(num_ddim_steps=st.T, num_inner_steps=st.N, early_stop=False, image_size=st.image_size)
    eager_unet = model.unet
    reset_memory(device)
    t0 = time.perf_counter()
    try:
        if mode != "none":
            torch._dynamo.reset()
            model.unet = torch.compile(eager_unet, mode=mode)
        engine = SlotEngine(model, cfg, rows, runtime_for(precision, device), pad=mode != "none")
        admit_s = fill_slots(engine, rows, st.image_size)
        first_g, t_g = time_calls(engine, rows, True, st.warmup_calls, st.timed_calls)
        first_ng, t_ng = time_calls(engine, rows, False, st.warmup_calls, st.timed_calls)
    finally:
        model.unet = eager_unet
    worst = per_image(admit_s, t_ng, t_g, rows, st.T, st.T * st.N)
    out = {
        "status": "ok",
        "grad_call_s": t_g,
        "no_grad_call_s": t_ng,
        "admit_s_per_image": admit_s,
        "s_per_image_worst": worst,
        "images_per_hour_worst": 3600 / worst,
        "s_per_image_early_stop": None,
        "peak_memory_bytes": peak_memory(device),
        "wall_s": time.perf_counter() - t0,
    }
    if mode != "none":
        out["compile_s"] = max(first_g - t_g, 0.0) + max(first_ng - t_ng, 0.0)
    del engine
    return out


# ---------------------------------------------------------------------------------------------------------
# Full runs of the engine (validation, early stop, agreement)
# ---------------------------------------------------------------------------------------------------------


def run_stream(model, cfg: InversionConfig, rows: int, runtime: Runtime, adm: list[Admission]):
    """(seconds per image, {tag: Inversion}, engine.calls) of one run of the engine over ``adm``."""
    engine = SlotEngine(model, cfg, rows, runtime)
    out = {}
    sync(model.device)
    t0 = time.perf_counter()
    for ev in engine.run(adm):
        if isinstance(ev, Failed):
            raise RuntimeError(f"image {ev.tag} failed: {ev.error}")
        if isinstance(ev, Finished):
            out[ev.tag] = ev.inversion
    sync(model.device)
    return (time.perf_counter() - t0) / len(adm), out, dict(engine.calls)


def full_run(model, st: Setting, config: dict, early_stop: bool) -> dict:
    """One full T-step run at the validation setting; with the prediction from ``config``'s call times."""
    rows, n = st.validate_batch, st.validate_images
    cfg = InversionConfig(num_ddim_steps=st.T, num_inner_steps=st.N, early_stop=early_stop, image_size=st.image_size)
    reset_memory(model.device)
    s, out, calls = run_stream(
        model, cfg, rows, runtime_for(config["precision"], model.device), admissions(n, st.image_size, seed=1)
    )
    inner = sum(int(inv.inner_steps.sum()) for inv in out.values()) / n
    predicted = per_image(
        config["admit_s_per_image"], config["no_grad_call_s"], config["grad_call_s"], rows, st.T, inner
    )
    return {
        "precision": config["precision"],
        "compile": "none",
        "batch_size": rows,
        "images": n,
        "T": st.T,
        "N": st.N,
        "early_stop": early_stop,
        "measured_s_per_image": s,
        "predicted_s_per_image": predicted,
        "measured_over_predicted": s / predicted,
        "inner_steps_per_image": inner,
        "calls": calls,
        "predicted_calls": {"no_grad": 3 * st.T * n / rows, "grad": inner * n / rows},
        "peak_memory_bytes": peak_memory(model.device),
    }


def flop_counts(model, st: Setting) -> dict:
    """FLOPs of one UNet forward and forward + backward per image (counted on ``meta``) and the worst-case
    floor per image (``bench.flops``), with its time at ``PEAK_TFLOPS``."""
    from nti_bench.flops import count_unet_flops, floor_flops

    unet = count_unet_flops(model.unet.config, latent_size=st.image_size // model.vae_scale_factor)
    worst = floor_flops(unet, st.T, st.N)
    return {
        **unet.to_dict(),
        "worst_case_per_image": worst,
        "peak_tflops_assumed": PEAK_TFLOPS,
        "floor_s_per_image": worst / (PEAK_TFLOPS * 1e12),
    }


def agreement_inputs(n: int, size: int) -> list[Admission]:
    files = sorted(SAMPLES_DIR.glob("*.png"))
    return [
        Admission(k, prepare_image(str(files[k % len(files)]), size), f"a photo of a {files[k % len(files)].stem}")
        for k in range(n)
    ]


def invert_on(device: torch.device, st: Setting, adm: list[Admission]) -> tuple[list, list[float]]:
    """fp32 slot-engine inversions of ``adm`` on ``device`` (TF32 off) and each reconstruction's PSNR."""
    model = build_bench_model("tiny", device)
    cfg = InversionConfig(num_ddim_steps=st.agree_T, num_inner_steps=st.agree_N, image_size=st.agree_size)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        _, out, _ = run_stream(model, cfg, len(adm), Runtime(), adm)
        invs = [out[a.tag] for a in adm]
        recon = decode_latents(model, torch.stack([inv.z_0 for inv in invs]).to(device)).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    return invs, [image_metrics(r, a.pixels)["psnr"] for r, a in zip(recon, adm)]


def agreement(device: torch.device, st: Setting, args) -> dict:
    adm = agreement_inputs(st.agree_images, st.agree_size)
    t0 = time.perf_counter()
    cpu_invs, cpu_psnr = invert_on(torch.device("cpu"), st, adm)
    dev_invs, dev_psnr = invert_on(device, st, adm)
    dz_T = max(float((c.z_T - d.z_T).abs().max()) for c, d in zip(cpu_invs, dev_invs))
    dpsnr = max(abs(c - d) for c, d in zip(cpu_psnr, dev_psnr))
    return {
        "model": "tiny",
        "reference": "cpu",
        "device": str(device),
        "precision": "32-true",
        "images": len(adm),
        "image_size": st.agree_size,
        "T": st.agree_T,
        "N": st.agree_N,
        "max_abs_dz_T": dz_T,
        "psnr_db_cpu": cpu_psnr,
        "psnr_db_device": dev_psnr,
        "max_abs_dpsnr_db": dpsnr,
        "pivot_tol": args.pivot_tol,
        "psnr_tol_db": args.psnr_tol_db,
        "passed": dz_T <= args.pivot_tol and dpsnr <= args.psnr_tol_db,
        "wall_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------


class Sweep:
    """The report and the order things run in; ``save()`` after every step."""

    def __init__(self, args, st: Setting, device: torch.device, argv) -> None:
        self.args, self.st, self.device = args, st, device
        self.budget = Budget(args.budget_s)
        cmd = "python scripts/gpu_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
        self.report = {
            "schema": "nti_lightning.gpu_sweep/1",
            "command": cmd,
            "quick": args.quick,
            "family": args.family,
            "model": st.model,
            "image_size": st.image_size,
            "T": st.T,
            "N": st.N,
            "budget_s": args.budget_s,
            "machine": machine(device),
            "extrapolation": "s/image = admit + (3·T·t_no_grad + G·t_grad) / B; G = T·N worst case, "
            "measured inner steps with early stop (scripts/gpu_sweep.py docstring)",
            "warmup_calls": st.warmup_calls,
            "timed_calls": st.timed_calls,
            "agreement": None,
            "configs": [],
            "validation": None,
            "early_stop": None,
            "skipped": [],
            "errors": [],
            "targets": None,
            "wall_s": 0.0,
        }

    def save(self) -> None:
        self.report["wall_s"] = self.budget.elapsed()
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.report, indent=2))

    def skip(self, what: str, reason: str) -> None:
        self.report["skipped"].append({"what": what, "reason": reason})

    def step(self, what: str, estimate_s: float, fn, catch: bool = True):
        """Runs ``fn()`` if the budget allows ``estimate_s`` more; else records the skip. None when skipped, or
        (``catch``) when ``fn`` raised: the error is recorded and the sweep goes on with its other steps."""
        if not self.budget.allows(estimate_s):
            self.skip(
                what,
                f"budget: {self.budget.elapsed():.0f} s of {self.budget.seconds:.0f} s used, "
                f"~{estimate_s:.0f} s needed",
            )
            return None
        print(f"[{self.budget.elapsed():6.1f} s] {what}", flush=True)
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 — one failed step must not lose the others' numbers
            if not catch:
                raise
            traceback.print_exc()
            self.report["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}"[:500]})
            result = None
        self.save()
        return result

    def run(self) -> dict:
        model = build_bench_model(self.st.model, self.device)
        self.report["model_build_s"] = self.budget.elapsed()
        self.report["flops"] = flop_counts(model, self.st)
        self.report["agreement"] = self.step(
            "agreement: tiny model, CPU vs device", 0, lambda: agreement(self.device, self.st, self.args)
        )
        precisions = self.st.precisions
        validate_precision = MIXED if MIXED in precisions else precisions[0]
        for precision in precisions:
            self.group(model, precision, "none", self.st.batch_sizes)
            if precision == validate_precision:
                self.validate(model)
        for mode in self.st.compile_modes[1:]:
            for precision in self.st.precisions:
                self.group(model, precision, mode, self.st.compile_batch_sizes, first_estimate=120)
        if self.st.compile_modes == ("none",):
            self.skip("torch.compile", "--quick does not compile" if self.args.quick else "--compile-mode none")
        self.fill_early_stop()
        self.fill_flop_rates()
        self.report["targets"] = {
            **targets(self.report["configs"]),
            "meaningful": not self.args.quick,
            "family": self.args.family,  # the targets are SD1.5's (issue #10)
        }
        self.save()
        return self.report

    def group(self, model, precision: str, mode: str, batch_sizes, first_estimate: float = 0.0) -> None:
        """The batch sizes of one (precision, compile) pair, until the first out-of-memory one."""
        estimate, oom, oom_status = first_estimate, None, None
        for rows in batch_sizes:
            entry = {"precision": precision, "compile": mode, "batch_size": rows}
            what = f"{precision}, compile {mode}, batch {rows}"
            if oom is not None and rows > oom:
                self.skip(what, f"batch {oom} failed first ({'out of memory' if oom_status == 'oom' else 'error'})")
                continue
            try:
                result = self.step(what, estimate, lambda: measure_config(model, self.st, precision, mode, rows), False)
            except Exception as e:  # noqa: BLE001 — an OOM (or a failed compile) ends this group, not the sweep
                if not is_oom(e):
                    traceback.print_exc()
                oom, oom_status = rows, "oom" if is_oom(e) else "error"
                result = {"status": oom_status, "error": f"{type(e).__name__}: {e}"[:300]}
            if result is None:
                continue
            if result["status"] != "ok":
                reset_memory(model.device)  # after the except block: its traceback held the engine's tensors
            self.report["configs"].append({**entry, **result})
            self.save()
            if result["status"] == "ok":
                estimate = result["wall_s"] * (2.2 if mode == "none" else 1.0)

    def validate(self, model) -> None:
        st = self.st
        base = next(
            (
                c
                for c in self.report["configs"]
                if c["status"] == "ok"
                and c["compile"] == "none"
                and c["batch_size"] == st.validate_batch
                and c["precision"] == MIXED
            ),
            None,
        )
        base = base or next(
            (c for c in self.report["configs"] if c["status"] == "ok" and c["batch_size"] == st.validate_batch), None
        )
        if base is None:
            self.skip("validation", f"batch {st.validate_batch} was not measured")
            return
        estimate = 1.3 * base["s_per_image_worst"] * st.validate_images + 5
        self.report["validation"] = self.step(
            f"validation: full T={st.T} run, {base['precision']}, batch {st.validate_batch}, early stop off",
            estimate,
            lambda: full_run(model, st, base, early_stop=False),
        )
        es = self.step("early stop: full run, the authors' rule", estimate, lambda: full_run(model, st, base, True))
        if es is not None:
            note = "the tiny model at --quick sizes: not a measurement" if self.args.quick else EARLY_STOP_NOTE
            self.report["early_stop"] = {**es, "note": note}

    def fill_flop_rates(self) -> None:
        """Per configuration: the worst case's counted UNet FLOPs per image over its UNet seconds per image."""
        per_image_flops = self.report["flops"]["worst_case_per_image"]
        for c in self.report["configs"]:
            if c["status"] == "ok":
                unet_s = c["s_per_image_worst"] - c["admit_s_per_image"]
                c["unet_tflops_worst"] = per_image_flops / unet_s / 1e12

    def fill_early_stop(self) -> None:
        es = self.report["early_stop"]
        if es is None:
            self.skip("early-stop s/image per configuration", "the early-stop run did not run")
            return
        for c in self.report["configs"]:
            if c["status"] == "ok":
                c["s_per_image_early_stop"] = per_image(
                    c["admit_s_per_image"],
                    c["no_grad_call_s"],
                    c["grad_call_s"],
                    c["batch_size"],
                    self.st.T,
                    es["inner_steps_per_image"],
                )


def targets(configs: list[dict]) -> dict:
    ok = [c for c in configs if c["status"] == "ok"]
    fits = [c for c in ok if c["peak_memory_bytes"] is not None and c["peak_memory_bytes"] <= MEMORY_80GB]
    best = min(fits or ok, key=lambda c: c["s_per_image_worst"], default=None)
    largest = max((c["batch_size"] for c in fits if c["compile"] == "none"), default=None)

    def name(c):
        return None if c is None else f"{c['precision']}, compile {c['compile']}, batch {c['batch_size']}"

    worst = None if best is None else best["s_per_image_worst"]
    return {
        "s_per_image_worst": {
            "target": f"<= {TARGETS['max_s_per_image_worst']}",
            "value": worst,
            "config": name(best),
            "met": None if worst is None else worst <= TARGETS["max_s_per_image_worst"],
        },
        "images_per_hour_worst": {
            "target": f">= {TARGETS['min_images_per_hour']:.0f}",
            "value": None if worst is None else 3600 / worst,
            "config": name(best),
            "met": None if worst is None else 3600 / worst >= TARGETS["min_images_per_hour"],
        },
        "largest_batch_in_80gb": {
            "target": f">= {TARGETS['min_batch_in_80gb']}",
            "value": largest,
            "met": None if largest is None else largest >= TARGETS["min_batch_in_80gb"],
        },
        "memory_limit_bytes": MEMORY_80GB,
        "fits_measured": bool(fits),
    }


def _fmt(x, fmt: str) -> str:
    return "—".rjust(int(fmt.split(".")[0])) if x is None else format(x, fmt)


def print_configs(report: dict) -> None:
    gpu = report["machine"].get("gpu") or report["machine"]["device"]
    print(f"\n{report['model']} {report['image_size']} px, T={report['T']}, N={report['N']}, {gpu}")
    head = (
        "precision",
        "compile",
        "B",
        "grad s",
        "nograd s",
        "s/img wc",
        "s/img ES",
        "img/h wc",
        "TFLOP/s",
        "peak GiB",
        "compile s",
    )
    print("{:<11} {:<8} {:>3} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>9}".format(*head))
    for c in report["configs"]:
        if c["status"] != "ok":
            print(f"{c['precision']:<11} {c['compile']:<8} {c['batch_size']:>3} {c['status']}")
            continue
        peak = None if c["peak_memory_bytes"] is None else c["peak_memory_bytes"] / 2**30
        cells = (
            f"{c['grad_call_s']:8.4f}",
            f"{c['no_grad_call_s']:8.4f}",
            f"{c['s_per_image_worst']:8.3f}",
            _fmt(c["s_per_image_early_stop"], "8.3f"),
            f"{c['images_per_hour_worst']:8.0f}",
            _fmt(c.get("unet_tflops_worst"), "7.3g"),
            _fmt(peak, "8.2f"),
            _fmt(c.get("compile_s"), "9.1f"),
        )
        print(f"{c['precision']:<11} {c['compile']:<8} {c['batch_size']:>3} " + " ".join(cells))


def print_summary(report: dict) -> None:
    for key in ("validation", "early_stop"):
        v = report[key]
        if v is not None:
            print(
                f"{key}: measured {v['measured_s_per_image']:.3f} s/image, predicted "
                f"{v['predicted_s_per_image']:.3f} (× {v['measured_over_predicted']:.2f}), "
                f"{v['inner_steps_per_image']:.0f} inner steps/image"
            )
    a = report["agreement"]
    if a is not None:
        print(
            f"agreement CPU vs {a['device']}: max |Δz*_T| {a['max_abs_dz_T']:.2e}, max |ΔPSNR| "
            f"{a['max_abs_dpsnr_db']:.3f} dB: {'passed' if a['passed'] else 'FAILED'}"
        )
    if report["early_stop"] is not None:
        print(f"note (early stop): {report['early_stop']['note']}")
    fl = report["flops"]
    print(
        f"FLOP floor: {fl['worst_case_per_image'] / 1e15:.3g} PFLOP/image worst case = "
        f"{fl['floor_s_per_image']:.3g} s at {fl['peak_tflops_assumed']:.0f} TFLOP/s"
    )
    for key, t in (report["targets"] or {}).items():
        if isinstance(t, dict):
            verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            value = f"{t['value']:.3g}" if isinstance(t["value"], float) else t["value"]
            print(f"target {key} {t['target']}: {value} ({t.get('config') or '—'}) → {verdict}")
    if report["quick"]:
        print("--quick: tiny model on CPU; the targets are for SD1.5 on a GPU and mean nothing here")
    for s in report["skipped"]:
        print(f"skipped {s['what']}: {s['reason']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args)
    sweep = Sweep(args, setting_for(args), device, argv)
    report = sweep.run()
    print_configs(report)
    print_summary(report)
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    agreed = report["agreement"] is None or report["agreement"]["passed"]
    for e in report["errors"]:
        print(f"ERROR in {e['what']}: {e['error']}", file=sys.stderr)
    return 0 if agreed and not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
