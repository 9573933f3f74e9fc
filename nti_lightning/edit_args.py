"""The argument parser of ``nti edit`` and what turns its arguments into an ``EditConfig``.

Light on purpose (no torch): ``nti --help`` builds this parser; ``p2p.cli`` runs the edits. Every default
comes from ``edit_config.EditConfig``; the help text (``DESCRIPTION``) is plain text, without markup.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from nti_lightning.edit_config import EDIT_DEFAULTS, EDIT_MODES, CrossReplace, EditConfig

D = EDIT_DEFAULTS
DESCRIPTION = f"""\
nti edit: Prompt-to-Prompt edits of inversions, one from the command line or many from a JSONL file.

  nti edit INVERSION --target "..." [--mode {"|".join(EDIT_MODES)}] [--blend WORD ...]
           [--reweight WORD=SCALE ...] [--cross-replace FRACTION [WORD=FRACTION ...]] [--self-replace FRACTION]
           [--attention] [--output DIR] [--overwrite]
  nti edit OUTPUT_DIR --edits EDITS.jsonl [--batch-size N] [--attention] [--results FILE] [--overwrite]

Batch form: each line of EDITS.jsonl is one edit of an image of an nti invert output folder,
  {{"image_id": "cat", "target": "a dog sitting next to a mirror", "mode": "replace", "blend": ["cat", "dog"],
   "reweight": {{"dog": 2}}, "cross_replace": {D.cross_replace}, "self_replace": {D.self_replace}}}
("inversion": "path/to/inversion.safetensors" instead of image_id; only target is required; mode,
cross_replace, self_replace and guidance_scale (w; default the inversion's) default to the command
line's). Edits of one image are sampled together, up to --batch-size per pass. Each edit gets
OUTPUT_DIR/<image_id>/edits/<line>_<target>{{.png,_strip.png,_attention.png,.json}} (OUTPUT_DIR/ab/<image_id>/...
for a folder written with output.subdirs=true: ids are looked up in its manifests) and a line in the results
JSONL (rewritten by each run); a line that cannot be applied is recorded as failed with the reason and the
others go on. The .json file holds the edit's resolved settings.

Names are never reused silently: an edit whose file name is taken is written as <name>-2, <name>-3, ...
(with --overwrite it replaces every file of the earlier edit instead, so no stale attention map remains).
"""


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
    p.add_argument("--mode", choices=EDIT_MODES, default=D.mode, help="edit kind (default: inferred from the prompts)")
    p.add_argument("--blend", nargs="+", metavar="WORD", default=None, help="local blend: change only these words")
    p.add_argument("--reweight", nargs="+", metavar="WORD=SCALE", default=None, help="scale a word's attention")
    p.add_argument(
        "--cross-replace",
        nargs="+",
        metavar="FRACTION|WORD=FRACTION",
        default=D.cross_replace,
        help="fraction of steps injecting the source's cross-attention (default %(default)s); "
        "WORD=FRACTION sets one target word's",
    )
    p.add_argument(
        "--self-replace",
        type=float,
        default=D.self_replace,
        metavar="FRACTION",
        help="fraction of steps injecting the source's self-attention (default %(default)s)",
    )
    p.add_argument("--guidance-scale", type=float, default=D.guidance_scale, help="default: the inversion's")
    p.add_argument(
        "--local-blend-start",
        type=float,
        default=D.local_blend_start,
        metavar="FRACTION",
        help="fraction of steps before the local blend starts (default %(default)s)",
    )
    p.add_argument(
        "--local-blend-threshold",
        type=float,
        default=D.local_blend_threshold,
        metavar="T",
        help="local-blend mask threshold on the words' attention (default %(default)s)",
    )
    p.add_argument("--attention", action="store_true", default=D.attention, help="also save each token's map (PNG)")
    p.add_argument("--overwrite", action="store_true", default=D.overwrite, help="replace an edit of the same name")
    p.add_argument("--model", default=None, help="model to load (default: the one recorded in the inversion)")
    p.add_argument(
        "--config-dir",
        default=None,
        help="a single-file checkpoint's diffusers config folder (default: the one recorded in the inversion)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--output", default=None, help="picture folder (single form; default: <inversion dir>/edits)")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="edits per sampling pass (default %(default)s)")
    p.add_argument("--results", default=None, help="results JSONL (batch form; default OUTPUT_DIR/edit_results.jsonl)")
    return p


# ---------------------------------------------------------------------------------------------------------
# Arguments → EditConfig
# ---------------------------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> EditConfig:
    """The run's settings: one ``EditConfig`` field per option of the same name (raises ValueError)."""
    values = {f.name: getattr(args, f.name) for f in fields(EditConfig)}
    values["cross_replace"] = parse_cross_replace(values["cross_replace"], D.cross_replace)
    return EditConfig(**values)


def parse_assignments(items: list[str] | None, what: str) -> dict[str, float]:
    """["cat=2", "red car=0.5"] → {"cat": 2.0, "red car": 0.5}."""
    out: dict[str, float] = {}
    for item in items or []:
        word, sep, value = item.rpartition("=")
        try:
            if not sep or not word.strip():
                raise ValueError
            out[word.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{what}: {item!r} is not WORD=NUMBER") from None
    return out


def parse_cross_replace(value, default: CrossReplace) -> CrossReplace:
    """A CLI list or a JSON value → a fraction, a (start, end) pair or {"default_": …, word: …}.

    ``default`` is the window of the tokens the value does not name (a list without a plain fraction).
    """
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        return {("default_" if k in ("default", "default_") else k): parse_window(v) for k, v in value.items()}
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return (float(value[0]), float(value[1]))
    if not isinstance(value, list):
        raise ValueError(f"cross_replace: {value!r} is not a fraction, a [start, end] pair or {{word: fraction}}")
    plain = [i for i in value if "=" not in str(i)]
    if len(plain) > 1:
        raise ValueError(f"--cross-replace: give one default fraction, got {plain}")
    words = parse_assignments([str(i) for i in value if "=" in str(i)], "--cross-replace")
    try:
        fraction = float(plain[0]) if plain else default
    except ValueError:
        raise ValueError(f"--cross-replace: {plain[0]!r} is not a fraction") from None
    return {"default_": fraction, **words} if words else fraction


def parse_window(value):
    """A JSON step window: a fraction or a [start, end] pair."""
    return tuple(float(x) for x in value) if isinstance(value, (list, tuple)) else float(value)
