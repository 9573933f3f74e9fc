"""``nti eval``'s argument parser and its flags as the keys of ``eval.config.EvalConfig`` they set.

Light on purpose (no torch, no OmegaConf): ``nti --help`` builds this parser. A flag sets its key only when
given; ``key=value`` arguments set any key (``inversion.learning_rate=0.02``, ``trainer.precision=bf16-mixed``).
"""

from __future__ import annotations

import argparse
import json

from nti_lightning.flags import flag_overrides
from nti_lightning.methods import METHODS

EVAL_USAGE = """Compare inverters on a PIE-Bench-format folder (mapping_file.json + annotation_images/): per image and
method invert, reconstruct, Prompt-to-Prompt edit as PIE-Bench, measure. Writes OUT/summary.md (PIE-Bench Table 1
columns), summary.json, per_image.jsonl (one line per image x method), psnr_vs_time.png (with matplotlib),
strips/<id>.png, and the run's own files (run.json, config.yaml, the records, logs/). A rerun skips finished
pairs (also after a kill or a stop signal); a second run on the folder is refused while one runs. Array tasks
(--shard-index/--num-shards) and ranks (trainer.devices, srun, torchrun) split the images as `nti invert` does.
Metrics needing networks read only local paths (--lpips, --dino, --clip); without them they are skipped with one
line. The flags are aliases of config keys; key=value arguments set any key (model.*, inversion.*, trainer.*,
data.*, edit.*, metrics.*, output.*, methods). See docs/eval.md."""

FLAG_KEYS = {
    "out": "output.dir",
    "model": "model.spec",
    "config_dir": "model.config_dir",
    "steps": "inversion.num_ddim_steps",
    "inner_steps": "inversion.num_inner_steps",
    "guidance_scale": "inversion.guidance_scale",
    "image_size": "inversion.image_size",
    "limit": "data.limit",
    "lpips": "metrics.lpips",
    "dino": "metrics.dino",
    "clip": "metrics.clip",
    "shard_index": "data.shard_index",
    "num_shards": "data.num_shards",
    "device": "trainer.accelerator",
}
"""Flag (argparse dest) → the key it sets."""


def add_eval_subparser(subparsers):
    p = subparsers.add_parser("eval", help="compare inverters on a PIE-Bench-format folder", description=EVAL_USAGE)
    p.add_argument("data", help="folder with mapping_file.json (e.g. nti_lightning/assets/pie_sample)")
    p.add_argument("--out", default=None, help="output folder (output.dir; default outputs/eval)")
    p.add_argument("--methods", default=None, help=f"comma-separated, of {','.join(METHODS)} (default: all)")
    p.add_argument("--model", default=None, help="model spec (default: the embedded tiny model)")
    p.add_argument("--config-dir", default=None, help="a single-file checkpoint's diffusers config folder")
    p.add_argument("--device", default=None, help="trainer.accelerator: cpu, cuda, gpu, mps or auto (default auto)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps T of every method (default 50)")
    p.add_argument("--inner-steps", type=int, default=None, help="NTI's Adam steps per timestep N (default 10)")
    p.add_argument("--guidance-scale", type=float, default=None, help="w (default 7.5)")
    p.add_argument("--image-size", type=int, default=None, help="working size (default: the model's native)")
    p.add_argument("--batch-size", default=None, help="rows per UNet call of the slot engine (default auto)")
    p.add_argument("--limit", type=int, default=None, help="only the first N entries")
    for name in ("lpips", "dino", "clip"):
        p.add_argument(f"--{name}", default=None, help=f"local path of the {name.upper()} network (else skipped)")
    p.add_argument("--shard-index", type=int, default=None, help="this job's shard (a SLURM array task)")
    p.add_argument("--num-shards", type=int, default=None)
    p.add_argument("--no-strips", action="store_true", help="do not write strips/")
    p.add_argument("--overwrite", action="store_true", help="start over a folder evaluated with other settings")
    p.add_argument("--config", default=None, help="YAML file of settings (the keys of key=value)")
    p.add_argument("--quiet", action="store_true", help="no per-pair log lines")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (inversion.batch_size=4, ...)")
    return p


def eval_overrides(args: argparse.Namespace) -> list[str]:
    """``nti eval``'s dotlist: DIR, the key=value arguments, then each flag given as the key it sets (values as
    JSON, which OmegaConf reads as YAML: paths with ':' ',' or spaces survive)."""
    overrides = [f"data.dir={json.dumps(args.data)}", *getattr(args, "overrides", []), *flag_overrides(args, FLAG_KEYS)]
    if args.methods is not None:
        overrides.append(f"methods={json.dumps([m.strip() for m in args.methods.split(',')])}")
    if args.batch_size is not None:
        size = args.batch_size if args.batch_size == "auto" else _int(args.batch_size, "--batch-size")
        overrides.append(f"inversion.batch_size={json.dumps(size)}")
    if args.no_strips:
        overrides.append("output.strips=false")
    if args.device is not None and ":" in args.device:
        raise ValueError(
            f"--device {args.device}: each rank takes its own device; give cuda or cpu (CUDA_VISIBLE_DEVICES "
            "chooses the cards)"
        )
    return overrides


def _int(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{flag} must be an integer or auto, got {value!r}") from None
