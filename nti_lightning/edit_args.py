"""The argument parser of ``nti edit`` and what turns its arguments into its settings.

Light on purpose (no torch, no OmegaConf): ``nti --help`` builds this parser; ``p2p.cli`` (one edit) and
``jobs.edit`` (an edits file) run the edits. The settings are ``jobs.edit_config.EditRunConfig``, loaded by
``config.load_config`` from ``--config`` and the ``key=value`` arguments; each flag is an alias of one key
(``edit_overrides``) and sets it only when given. Every default shown comes from ``edit_config.EditConfig``; the
help text (``DESCRIPTION``) is plain text, without markup.
"""

from __future__ import annotations

import argparse
import json
import re

from nti_lightning.edit_config import (
    EDIT_DEFAULTS,
    EDIT_MODES,
    EditConfig,
    parse_assignments,
    parse_cross_replace,
    parse_window,
)
from nti_lightning.flags import flag_overrides

D = EDIT_DEFAULTS
DESCRIPTION = f"""\
nti edit: Prompt-to-Prompt edits of inversions, one from the command line or many from a JSONL file.

  nti edit INVERSION --target "..." [--mode {"|".join(EDIT_MODES)}] [--blend WORD ...]
           [--reweight WORD=SCALE ...] [--cross-replace FRACTION [WORD=FRACTION ...]] [--self-replace FRACTION]
           [--attention] [--output DIR] [--overwrite] [key=value ...]
  nti edit OUTPUT_DIR --edits EDITS.jsonl [--batch-size N] [--attention] [--results FILE] [--overwrite]
           [data.shard_index=S data.num_shards=K] [key=value ...]

Batch form: each line of EDITS.jsonl is one edit of an image of an nti invert output folder,
  {{"image_id": "cat", "target": "a dog sitting next to a mirror", "mode": "replace", "blend": ["cat", "dog"],
   "reweight": {{"dog": 2}}, "cross_replace": {D.cross_replace}, "self_replace": {D.self_replace}}}
("inversion": "images/cat/inversion.safetensors", a path inside OUTPUT_DIR, instead of image_id; only target is
required; mode, cross_replace, self_replace and guidance_scale (w; default the inversion's) default to the
command line's). An image_id is looked up among the images the run recorded as done. The job has its own
folder, OUTPUT_DIR/edits (output.folder): its lock, run.json, config.yaml, records and logs. Each edit gets
OUTPUT_DIR/edits/images/<image_id>/<line>_<target>{{.png,_strip.png,_attention.png,.json}}; a rerun skips the
lines already done and redoes a line whose content or settings changed, into the same names. Array tasks split
the lines (data.shard_index, data.num_shards), as do ranks (trainer.devices). A line that cannot be applied is
recorded as failed with the reason and the others go on (a rerun retries it). At the end
OUTPUT_DIR/edits/results.jsonl (--results) lists every line's result. The .json file holds the edit's resolved
settings.

Single form: names are never reused silently: an edit whose file name is taken is written as <name>-2,
<name>-3, ... (with --overwrite it replaces every file of the earlier edit instead, so no stale attention map
remains). In the batch form --overwrite starts the job's records over: every line is redone.

Settings: the flags are aliases of keys of the edit config (edit.*, model.*, trainer.*, data.*, output.*);
key=value arguments set any key, --config a YAML file of them.
"""
SECTIONS = ("edit", "model", "trainer", "data", "output")
_OVERRIDE = re.compile(rf"({'|'.join(SECTIONS)})\.[A-Za-z_][\w.]*=")


def add_edit_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "edit",
        help="Prompt-to-Prompt edit of inverted images",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inversion", help="an inversion .safetensors file, or with --edits an nti invert output folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", help="the target prompt")
    what.add_argument("--edits", help="JSONL with one edit per line over the output folder (batch form)")
    p.add_argument("--mode", choices=EDIT_MODES, default=None, help="edit kind (default: inferred from the prompts)")
    p.add_argument("--blend", nargs="+", metavar="WORD", default=None, help="local blend: change only these words")
    p.add_argument("--reweight", nargs="+", metavar="WORD=SCALE", default=None, help="scale a word's attention")
    p.add_argument(
        "--cross-replace",
        nargs="+",
        metavar="FRACTION|WORD=FRACTION",
        default=None,
        help=f"fraction of steps injecting the source's cross-attention (default {D.cross_replace}); "
        "WORD=FRACTION sets one target word's",
    )
    p.add_argument(
        "--self-replace",
        type=float,
        default=None,
        metavar="FRACTION",
        help=f"fraction of steps injecting the source's self-attention (default {D.self_replace})",
    )
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the inversion's")
    p.add_argument(
        "--local-blend-start",
        type=float,
        default=None,
        metavar="FRACTION",
        help=f"fraction of steps before the local blend starts (default {D.local_blend_start})",
    )
    p.add_argument(
        "--local-blend-threshold",
        type=float,
        default=None,
        metavar="T",
        help=f"local-blend mask threshold on the words' attention (default {D.local_blend_threshold})",
    )
    p.add_argument("--attention", action="store_true", default=None, help="also save each token's map (PNG)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an edit of the same name")
    p.add_argument("--model", default=None, help="model to load (default: the one recorded in the inversion)")
    p.add_argument(
        "--config-dir",
        default=None,
        help="a single-file checkpoint's diffusers config folder (default: the one recorded in the inversion)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--output", default=None, help="picture folder (single form; default: <inversion dir>/edits)")
    p.add_argument("--batch-size", type=int, default=None, help=f"edits per sampling pass (default {D.batch_size})")
    p.add_argument("--results", default=None, help="results JSONL (batch form; default OUTPUT_DIR/edits/results.jsonl)")
    p.add_argument("--config", default=None, help="YAML file of settings (the keys of key=value)")
    p.add_argument("--quiet", action="store_true", help="batch form: no per-line log lines")
    p.add_argument("overrides", nargs="*", help="key=value settings (edit.batch_size=8, data.num_shards=4, ...)")
    return p


# ---------------------------------------------------------------------------------------------------------
# Arguments → settings
# ---------------------------------------------------------------------------------------------------------

FLAG_KEYS = {
    "mode": "edit.mode",
    "self_replace": "edit.self_replace",
    "guidance_scale": "edit.guidance_scale",
    "local_blend_start": "edit.local_blend_start",
    "local_blend_threshold": "edit.local_blend_threshold",
    "batch_size": "edit.batch_size",
    "attention": "edit.attention",
    "overwrite": "edit.overwrite",
    "model": "model.spec",
    "config_dir": "model.config_dir",
    "edits": "data.edits",
    "results": "output.results",
}
"""Flag (argparse dest) → the key it sets."""


def moved_overrides(args: argparse.Namespace) -> list[str]:
    """``key=value`` items that options taking several values (``--cross-replace``, ``--reweight``) swallowed
    (``--cross-replace 0.6 edit.mode=refine``): taken out of those lists, returned as overrides."""
    moved = []
    for name in ("cross_replace", "reweight", "blend"):
        values = getattr(args, name, None)
        if values:
            moved += [v for v in values if _OVERRIDE.match(v)]
            setattr(args, name, [v for v in values if not _OVERRIDE.match(v)] or None)
    return moved


def edit_overrides(args: argparse.Namespace) -> list[str]:
    """``nti edit``'s dotlist: the key=value arguments, then each flag given as the key it sets (values as JSON,
    which OmegaConf reads as YAML: paths with ':' ',' or spaces survive)."""
    overrides = [*getattr(args, "overrides", []), *moved_overrides(args), *flag_overrides(args, FLAG_KEYS)]
    if args.cross_replace is not None:
        overrides.append(f"edit.cross_replace={json.dumps(parse_cross_replace(args.cross_replace, D.cross_replace))}")
    if args.edits:  # the batch form: the run folder, and --device as the accelerator
        overrides.append(f"output.dir={json.dumps(args.inversion)}")
        if args.device is not None:
            if ":" in args.device:
                raise ValueError(
                    f"--device {args.device}: the batch form picks devices per rank; give cuda or cpu "
                    "(CUDA_VISIBLE_DEVICES chooses the card)"
                )
            overrides.append(f"trainer.accelerator={json.dumps(args.device)}")
    return overrides


def run_config_from_args(args: argparse.Namespace):
    """The run's ``EditRunConfig``: ``--config`` ← key=value ← flags (raises ``config.ConfigError``, a ValueError)."""
    from nti_lightning.config import load_config
    from nti_lightning.jobs.edit_config import EditRunConfig

    return load_config(getattr(args, "config", None), edit_overrides(args), base=EditRunConfig)


def config_from_args(args: argparse.Namespace) -> EditConfig:
    """Every edit's settings (the ``edit`` section; raises ValueError)."""
    return run_config_from_args(args).edit


__all__ = ["add_edit_subparser", "config_from_args", "edit_overrides", "parse_assignments", "parse_cross_replace",
           "parse_window", "run_config_from_args"]  # fmt: skip
