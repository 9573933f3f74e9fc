"""``nti edit``: running Prompt-to-Prompt edits of inversions (the usage, shown by ``nti edit --help``, is the
docstring of ``nti_lightning.edit_args``, where the argument parser lives so that ``nti --help`` stays light)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from nti_lightning.edit_args import DEFAULT_BATCH_SIZE, add_edit_subparser  # noqa: F401 (a light module)
from nti_lightning.inversion import Inversion, load_inversion
from nti_lightning.p2p.alignment import AlignmentError, WordNotInPromptError
from nti_lightning.p2p.edit import (
    CROSS_REPLACE_STEPS,
    SELF_REPLACE_STEPS,
    EditResult,
    EditSpec,
    build_controller,
    edit_batch,
    input_image,
)
from nti_lightning.text import PromptError, check_prompt

EXIT_USAGE_ERROR = 2
EDIT_KEYS = {
    "image_id",
    "inversion",
    "target",
    "mode",
    "blend",
    "reweight",
    "cross_replace",
    "self_replace",
    "guidance_scale",
}


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


def parse_cross_replace(items: list[str] | float | dict | None):
    """CLI list or JSON value → a fraction, a [start, end] pair or {"default_": …, word: …}."""
    if items is None:
        return CROSS_REPLACE_STEPS
    if isinstance(items, (int, float)):
        return float(items)
    if isinstance(items, dict):
        return {("default_" if k in ("default", "default_") else k): _window(v) for k, v in items.items()}
    if isinstance(items, list) and len(items) == 2 and all(isinstance(v, (int, float)) for v in items):
        return (float(items[0]), float(items[1]))
    plain = [i for i in items if "=" not in str(i)]
    if len(plain) > 1:
        raise ValueError(f"--cross-replace: give one default fraction, got {plain}")
    words = parse_assignments([i for i in items if "=" in str(i)], "--cross-replace")
    default = float(plain[0]) if plain else CROSS_REPLACE_STEPS
    return {"default_": default, **words} if words else default


def _window(v):
    return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)


def spec_from_record(rec: dict) -> tuple[EditSpec, float | None]:
    """One JSONL line → (EditSpec, guidance scale or None). Raises ValueError naming the bad field."""
    unknown = sorted(set(rec) - EDIT_KEYS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(EDIT_KEYS)}")
    target = rec.get("target")
    if not isinstance(target, str):
        raise ValueError('missing "target" (the target prompt)')
    blend = rec.get("blend")
    blend = [blend] if isinstance(blend, str) else blend
    reweight = rec.get("reweight")
    if isinstance(reweight, list):
        reweight = parse_assignments(reweight, "reweight")
    elif reweight is not None and not isinstance(reweight, dict):
        raise ValueError('"reweight" must be {"word": scale} or ["word=scale", ...]')
    spec = EditSpec(
        target=target,
        mode=rec.get("mode"),
        cross_replace_steps=parse_cross_replace(rec.get("cross_replace")),
        self_replace_steps=_window(rec.get("self_replace", SELF_REPLACE_STEPS)),
        blend_words=blend,
        reweight={k: float(v) for k, v in reweight.items()} if reweight else None,
    )
    guidance = rec.get("guidance_scale")
    return spec, float(guidance) if guidance is not None else None


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------

EDIT_ERRORS = (AlignmentError, WordNotInPromptError, PromptError, ValueError, FileNotFoundError)


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "edit"


def save_png(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def save_pictures(
    folder: Path, stem: str, result: EditResult, k: int, strip_input: Image.Image, attention: bool
) -> dict[str, Path]:
    """The edit, the strip (input | reconstruction | edit) and optionally the attention figure."""
    from nti_lightning.metrics import make_strip

    paths = {"edit": folder / f"{stem}.png", "strip": folder / f"{stem}_strip.png"}
    save_png(paths["edit"], result.images[k])
    save_png(paths["strip"], make_strip([strip_input, result.images[0], result.images[k]]))
    if attention and result.attention is not None:
        paths["attention"] = folder / f"{stem}_attention.png"
        save_png(paths["attention"], result.attention_image(k))
    return paths


def load_model_for(inv: Inversion, spec: str | None, device: str | None):
    import torch

    from nti_lightning.models import load_model

    source = spec or inv.meta.get("model_source") or "tiny"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(source, device=device)


def run_edit(args) -> int:
    """Entry point of ``nti edit`` (argparse namespace from ``add_edit_subparser``)."""
    try:
        if args.edits:
            return run_batch(args)
        return run_single(args)
    except EDIT_ERRORS as e:
        print(f"nti edit: {e}", file=sys.stderr)
        return EXIT_USAGE_ERROR


def run_single(args) -> int:
    # 1. The inversion and its model (load_inversion checks they match)
    inv = load_inversion(args.inversion)
    model = load_model_for(inv, args.model, args.device)
    inv = load_inversion(args.inversion, model)
    # 2. The edit
    spec = EditSpec(
        target=args.target,
        mode=args.mode,
        cross_replace_steps=parse_cross_replace(args.cross_replace),
        self_replace_steps=args.self_replace,
        blend_words=args.blend,
        reweight=parse_assignments(args.reweight, "--reweight") or None,
    )
    result = edit_batch(model, inv, [spec], args.guidance_scale, return_attention=args.attention)
    # 3. Pictures
    folder = Path(args.output) if args.output else Path(args.inversion).resolve().parent / "edits"
    paths = save_pictures(folder, slug(args.target), result, 1, input_image(model, inv), args.attention)
    print(f"{result.modes[0] or 'no edit'}: {inv.prompt!r} → {args.target!r}")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


@dataclass
class Line:
    number: int  # 1-based line in the JSONL
    record: dict
    image_id: str = ""
    inversion: Path | None = None
    spec: EditSpec | None = None
    guidance: float | None = None
    edits_dir: Path | None = None  # None: root/<image_id>/edits


def read_edit_lines(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                yield n, None, f"not valid JSON ({e.msg})"
                continue
            yield (n, rec, None) if isinstance(rec, dict) else (n, None, "not a JSON object")


def manifest_inversions(root: Path) -> dict[str, str]:
    """image id → inversion path (relative to ``root``) of the finished images of an ``nti invert`` output
    folder, from its manifests: with ``output.subdirs=true`` an image's folder is ``root/ab/<id>/``."""
    from nti_lightning.run import read_manifest

    recs = read_manifest(root)
    return {k: r["paths"]["inversion"] for k, r in recs.items() if r.get("status") == "ok" and "paths" in r}


def resolve_line(root: Path, line: Line, lookup: Callable[[str], str | None] | None = None) -> None:
    rec = line.record
    if "inversion" in rec:
        path = Path(rec["inversion"])
        line.inversion = path if path.is_absolute() else root / path
        line.image_id = str(rec.get("image_id") or line.inversion.parent.name)
    elif "image_id" in rec:
        line.image_id = str(rec["image_id"])
        line.inversion = root / line.image_id / "inversion.safetensors"
        found = lookup(line.image_id) if lookup is not None and not line.inversion.is_file() else None
        if found:  # output.subdirs: root/ab/<id>/, edits next to it
            line.inversion = root / found
            line.edits_dir = line.inversion.parent / "edits"
    else:
        raise ValueError('give "image_id" (a sub-folder of the output folder) or "inversion" (a file)')
    if not line.inversion.is_file():
        raise FileNotFoundError(f"no inversion at {line.inversion}")
    line.spec, line.guidance = spec_from_record(rec)


def run_batch(args) -> int:
    root = Path(args.inversion)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; the batch form (--edits) takes an `nti invert` output folder")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    results_path = Path(args.results) if args.results else root / "edit_results.jsonl"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text("")
    counts = {"ok": 0, "failed": 0}

    def record(line: Line, status: str, **fields) -> None:
        counts[status] += 1
        rec = {"line": line.number, "image_id": line.image_id or None, "target": line.record.get("target")}
        rec.update(status=status, **fields)
        with open(results_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if status == "failed":
            print(f"line {line.number}: failed: {fields.get('error')}", file=sys.stderr)

    # 1. Read and check every line; group the good ones by (inversion, guidance scale)
    groups: dict[tuple[Path, float | None], list[Line]] = {}
    manifest: dict[str, str] = {}

    def lookup(image_id: str) -> str | None:  # manifests read once, at the first id not at root/<id>/
        if not manifest:
            manifest.update(manifest_inversions(root) or {"": ""})
        return manifest.get(image_id)

    for n, rec, error in read_edit_lines(Path(args.edits)):
        line = Line(n, rec or {})
        try:
            if error:
                raise ValueError(error)
            resolve_line(root, line, lookup)
        except EDIT_ERRORS as e:
            record(line, "failed", error=str(e))
            continue
        groups.setdefault((line.inversion.resolve(), line.guidance), []).append(line)

    # 2. One model for the folder (every inversion is checked against it)
    model = None
    for (inv_path, guidance), lines in groups.items():
        try:
            inv = load_inversion(inv_path)
            model = model or load_model_for(inv, args.model, args.device)
            inv = load_inversion(inv_path, model)
        except Exception as e:  # unreadable file, other model: every edit of this image fails
            for line in lines:
                record(line, "failed", error=f"{type(e).__name__}: {e}")
            continue
        # 3. Per-line checks against the source prompt (alignment, words), then batches of edits
        good: list[Line] = []
        for line in lines:
            try:
                check_prompt(model.tokenizer, line.spec.target, label="target")
                latent_hw = tuple(inv.z_T.shape[-2:])
                build_controller(model.tokenizer, inv.prompt, [line.spec], inv.num_steps, latent_hw)
                good.append(line)
            except EDIT_ERRORS as e:
                record(line, "failed", error=str(e))
        strip_input = input_image(model, inv) if good else None
        for start in range(0, len(good), args.batch_size):
            chunk = good[start : start + args.batch_size]
            t0 = time.perf_counter()
            try:
                result = edit_batch(model, inv, [ln.spec for ln in chunk], guidance, return_attention=args.attention)
            except Exception as e:  # e.g. out of memory: these edits fail, the rest go on
                for line in chunk:
                    record(line, "failed", error=f"edit failed: {type(e).__name__}: {e}")
                continue
            seconds = (time.perf_counter() - t0) / len(chunk)
            for k, line in enumerate(chunk, 1):
                folder = line.edits_dir or root / line.image_id / "edits"
                paths = save_pictures(
                    folder, f"{line.number:04d}_{slug(line.spec.target)}", result, k, strip_input, args.attention
                )
                rel = {name: _relative(p, root) for name, p in paths.items()}
                record(line, "ok", mode=result.modes[k - 1], paths=rel, seconds=round(seconds, 3))
    print(f"{counts['ok']} edited, {counts['failed']} failed → {results_path}")
    return 0


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


__all__ = ["add_edit_subparser", "run_edit"]
