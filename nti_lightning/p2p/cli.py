"""``nti edit``: running Prompt-to-Prompt edits of inversions (the usage, shown by ``nti edit --help``, and the
argument parser live in ``nti_lightning.edit_args``, so that ``nti --help`` stays light).

Both forms resolve the run's ``EditConfig`` from the command line, edit, and write each edit's files through
``p2p.outputs.save_edit`` (the edit, its labelled strip, its attention figure, its settings JSON).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from nti_lightning.edit_args import add_edit_subparser, config_from_args, parse_assignments
from nti_lightning.edit_config import EditConfig
from nti_lightning.p2p.alignment import AlignmentError, WordNotInPromptError
from nti_lightning.p2p.edit import EditSpec, build_controller, edit_batch
from nti_lightning.p2p.edit_file import Line, ManifestLookup, read_edit_lines, resolve_line
from nti_lightning.p2p.figures import input_image
from nti_lightning.p2p.outputs import save_edit, settings_record, slug
from nti_lightning.store.inversion import Inversion, load_inversion
from nti_lightning.text import PromptError, check_prompt

EXIT_USAGE_ERROR = 2
EDIT_ERRORS = (AlignmentError, WordNotInPromptError, PromptError, ValueError, FileNotFoundError)
"""What a user can fix: a message and exit 2 (a JSONL line: recorded as failed, the others go on)."""


def run_edit(args) -> int:
    """Entry point of ``nti edit`` (argparse namespace from ``add_edit_subparser``)."""
    try:
        if args.edits:
            return run_batch(args)
        return run_single(args)
    except EDIT_ERRORS as e:
        print(f"nti edit: {e}", file=sys.stderr)
        return EXIT_USAGE_ERROR


def model_args_for(meta: dict, spec: str | None, config_dir: str | None) -> tuple[str, str | None]:
    """(spec, config_dir) to load for an inversion: the user's ``--model`` / ``--config-dir`` where given, else
    the record's ``model_source`` / ``model_config_dir`` (the config folder of a single-file checkpoint), else
    the tiny model."""
    return spec or meta.get("model_source") or "tiny", config_dir or meta.get("model_config_dir")


def load_model_for(inv: Inversion, spec: str | None, device: str | None, config_dir: str | None = None):
    import torch

    from nti_lightning.models import load_model

    source, config_dir = model_args_for(inv.meta, spec, config_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(source, device=device, config_dir=config_dir)


def run_single(args) -> int:
    """``nti edit INVERSION --target ...``: one edit, its files in ``--output`` (default: beside the inversion)."""
    # 1. The settings, the inversion and its model (load_inversion checks they match)
    config = config_from_args(args)
    inv = load_inversion(args.inversion)
    model = load_model_for(inv, args.model, args.device, args.config_dir)
    inv = load_inversion(args.inversion, model)
    # 2. The edit
    spec = EditSpec(
        target=args.target,
        mode=config.mode,
        cross_replace_steps=config.cross_replace,
        self_replace_steps=config.self_replace,
        blend_words=args.blend,
        reweight=parse_assignments(args.reweight, "--reweight") or None,
    )
    result = sample_edits(model, inv, [spec], config)
    # 3. Its files
    folder = Path(args.output) if args.output else Path(args.inversion).resolve().parent / "edits"
    record = settings_record(Path(args.inversion), inv, model, spec, config, result, 1)
    paths = save_edit(folder, slug(args.target), result, 1, input_image(model, inv), record, config)
    print(f"{result.modes[0] or 'no edit'}: {inv.prompt!r} → {args.target!r}")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


def sample_edits(model, inv: Inversion, specs: list[EditSpec], config: EditConfig):
    """``edit_batch`` with the run's settings (the specs carry the per-edit ones)."""
    return edit_batch(
        model,
        inv,
        specs,
        config.guidance_scale,
        return_attention=config.attention,
        local_blend_start=config.local_blend_start,
        local_blend_threshold=config.local_blend_threshold,
    )


# ---------------------------------------------------------------------------------------------------------
# Batch form
# ---------------------------------------------------------------------------------------------------------


class ResultsLog:
    """The results JSONL of a batch run (one line per edit line, rewritten by each run) and the counts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts = {"ok": 0, "failed": 0}

    def __enter__(self) -> ResultsLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def record(self, line: Line, status: str, **fields) -> None:
        self.counts[status] += 1
        rec = {"line": line.number, "image_id": line.image_id or None, "target": line.record.get("target")}
        self.file.write(json.dumps({**rec, "status": status, **fields}) + "\n")
        self.file.flush()
        if status == "failed":
            print(f"line {line.number}: failed: {fields.get('error')}", file=sys.stderr)


def run_batch(args) -> int:
    """``nti edit OUTPUT --edits FILE``: every line of FILE edits an image of the output folder."""
    # 1. Check the arguments; the run's settings are every line's defaults
    root = Path(args.inversion)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; the batch form (--edits) takes an `nti invert` output folder")
    if args.blend or args.reweight:
        raise ValueError('--blend and --reweight are per edit in the batch form: give "blend" / "reweight" per line')
    config = config_from_args(args)
    results_path = Path(args.results) if args.results else root / "edit_results.jsonl"
    with ResultsLog(results_path) as log:
        # 2. Read and check every line; group the good ones by (inversion, guidance scale)
        groups = group_lines(root, Path(args.edits), config, log)
        # 3. Per image: load it (one model for the folder), check its lines, edit them in batches
        model = None
        for (inv_path, guidance), lines in groups.items():
            model = edit_one_image(root, inv_path, lines, model, args, replace(config, guidance_scale=guidance), log)
    print(f"{log.counts['ok']} edited, {log.counts['failed']} failed → {results_path}")
    return 0


def group_lines(root: Path, edits: Path, config: EditConfig, log: ResultsLog) -> dict[tuple, list[Line]]:
    """The lines that resolve, by (inversion, guidance scale); the others are recorded as failed."""
    groups: dict[tuple[Path, float | None], list[Line]] = {}
    lookup = ManifestLookup(root)
    for n, rec, error in read_edit_lines(edits):
        line = Line(n, rec or {})
        try:
            if error:
                raise ValueError(error)
            resolve_line(root, line, config, lookup)
        except EDIT_ERRORS as e:
            log.record(line, "failed", error=str(e))
            continue
        groups.setdefault((line.inversion.resolve(), line.config.guidance_scale), []).append(line)
    return groups


def edit_one_image(root: Path, inv_path: Path, lines: list[Line], model, args, config: EditConfig, log: ResultsLog):
    """Edits ``lines`` of one inversion sharing ``config.guidance_scale`` (``config.batch_size`` per pass);
    returns the model (loaded at the first image). An image that cannot be loaded fails all its lines; a line
    that cannot be applied fails alone."""
    # 1. The inversion, checked against the folder's model
    try:
        inv = load_inversion(inv_path)
        model = model or load_model_for(inv, args.model, args.device, args.config_dir)
        inv = load_inversion(inv_path, model)
    except Exception as e:  # unreadable file, other model: every edit of this image fails
        for line in lines:
            log.record(line, "failed", error=f"{type(e).__name__}: {e}")
        return model
    # 2. Per-line checks against the source prompt (alignment, words)
    good = [line for line in lines if line_applies(model, inv, line, log)]
    source = input_image(model, inv) if good else None
    # 3. Batches of edits; each edit's files
    for start in range(0, len(good), config.batch_size):
        chunk = good[start : start + config.batch_size]
        t0 = time.perf_counter()
        try:
            result = sample_edits(model, inv, [ln.spec for ln in chunk], config)
        except Exception as e:  # e.g. out of memory: these edits fail, the rest go on
            for line in chunk:
                log.record(line, "failed", error=f"edit failed: {type(e).__name__}: {e}")
            continue
        seconds = round((time.perf_counter() - t0) / len(chunk), 3)
        for k, line in enumerate(chunk, 1):
            folder = line.edits_dir or root / line.image_id / "edits"
            record = settings_record(inv_path, inv, model, line.spec, line.config, result, k)
            paths = save_edit(folder, f"{line.number:04d}_{slug(line.spec.target)}", result, k, source, record, config)
            rel = {name: _relative(p, root) for name, p in paths.items()}
            log.record(line, "ok", mode=result.modes[k - 1], paths=rel, seconds=seconds)
    return model


def line_applies(model, inv: Inversion, line: Line, log: ResultsLog) -> bool:
    """The line's target fits the tokenizer and aligns with the source prompt for its mode; else it fails."""
    try:
        check_prompt(model.tokenizer, line.spec.target, label="target")
        build_controller(model.tokenizer, inv.prompt, [line.spec], inv.num_steps, tuple(inv.z_T.shape[-2:]))
    except EDIT_ERRORS as e:
        log.record(line, "failed", error=str(e))
        return False
    return True


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


__all__ = ["add_edit_subparser", "run_edit"]
