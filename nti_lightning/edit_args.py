"""``nti edit``: Prompt-to-Prompt edits of inversions, one from the command line or many from a JSONL file.

  nti edit INVERSION --target "..." [--mode replace|refine|reweight] [--blend WORD ...]
           [--reweight WORD=SCALE ...] [--cross-replace 0.8 [WORD=FRACTION ...]] [--self-replace 0.4]
           [--attention] [--output DIR]
  nti edit OUTPUT_DIR --edits EDITS.jsonl [--batch-size 4] [--attention] [--results FILE]

Batch form: each line of EDITS.jsonl is one edit of an image of an ``nti invert`` output folder,
  {"image_id": "cat", "target": "a dog sitting next to a mirror", "mode": "replace", "blend": ["cat", "dog"],
   "reweight": {"dog": 2}, "cross_replace": 0.8, "self_replace": 0.4, "guidance_scale": 7.5}
(``"inversion": "path/to/inversion.safetensors"`` instead of ``image_id``; only ``target`` is required). Edits
of one image are sampled together, up to --batch-size per pass. Each edit gets
OUTPUT_DIR/<image_id>/edits/<line>_<target>{,_strip,_attention}.png (OUTPUT_DIR/ab/<image_id>/edits/... for a folder
written with ``output.subdirs=true``: ids are looked up in its manifests) and a line in the results JSONL; a line
that cannot be applied is recorded as failed with the reason and the others go on.
"""

from __future__ import annotations

import argparse

MODES = ("replace", "refine", "reweight")
CROSS_REPLACE_STEPS = 0.8
"""Fraction of the steps (from the start) in which the source's cross-attention is injected (authors: 0.8)."""
SELF_REPLACE_STEPS = 0.4
"""Fraction of the steps in which the source's self-attention is injected (authors: 0.4–0.6 per example)."""
DEFAULT_BATCH_SIZE = 4
"""Edits of one image sampled in one pass (the UNet batch is 2·(1 + edits))."""


def add_edit_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "edit",
        help="Prompt-to-Prompt edit of inverted images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inversion", help="an inversion .safetensors file, or with --edits an `nti invert` output folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", help="the target prompt")
    what.add_argument("--edits", help="JSONL with one edit per line over the output folder (batch form)")
    p.add_argument("--mode", choices=MODES, default=None, help="edit kind (default: inferred from the prompts)")
    p.add_argument("--blend", nargs="+", metavar="WORD", default=None, help="local blend: change only these words")
    p.add_argument("--reweight", nargs="+", metavar="WORD=SCALE", default=None, help="scale a word's attention")
    p.add_argument(
        "--cross-replace",
        nargs="+",
        metavar="FRACTION|WORD=FRACTION",
        default=None,
        help=f"fraction of steps injecting the source's cross-attention (default {CROSS_REPLACE_STEPS}); "
        "WORD=FRACTION sets one target word's",
    )
    p.add_argument("--self-replace", type=float, default=SELF_REPLACE_STEPS, help="fraction for self-attention")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the inversion's")
    p.add_argument("--attention", action="store_true", help="also save each token's cross-attention map (PNG)")
    p.add_argument("--model", default=None, help="model to load (default: the one recorded in the inversion)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--output", default=None, help="picture folder (single form; default: <inversion dir>/edits)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="edits per sampling pass")
    p.add_argument("--results", default=None, help="results JSONL (batch form; default OUTPUT_DIR/edit_results.jsonl)")
    return p


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------
