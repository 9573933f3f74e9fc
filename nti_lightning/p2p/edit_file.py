"""The edits JSONL of ``nti edit OUTPUT --edits FILE``: reading its lines and resolving each to an edit.

A line is ``{"image_id" | "inversion", "target", "mode", "blend", "reweight", "cross_replace",
"self_replace", "guidance_scale"}``; only ``target`` is required. ``mode``, ``cross_replace``,
``self_replace`` and ``guidance_scale`` override the run's ``EditConfig`` (the command line's) for that line.
Every problem is a ValueError / FileNotFoundError naming the field, so the line fails and the others go on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from nti_lightning.edit_args import parse_assignments, parse_cross_replace, parse_window
from nti_lightning.edit_config import EditConfig
from nti_lightning.p2p.edit import EditSpec

CONFIG_KEYS = ("mode", "cross_replace", "self_replace", "guidance_scale")
"""Fields of ``EditConfig`` a line may set."""
EDIT_KEYS = {"image_id", "inversion", "target", "blend", "reweight", *CONFIG_KEYS}


@dataclass
class Line:
    """One line of the edits file and what it resolves to."""

    number: int  # 1-based line in the JSONL
    record: dict
    image_id: str = ""
    inversion: Path | None = None
    spec: EditSpec | None = None
    config: EditConfig | None = None  # the run's, with this line's fields
    edits_dir: Path | None = None  # None: root/<image_id>/edits


def read_edit_lines(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, record or None, error or None) for every non-blank line."""
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


def spec_from_record(rec: dict, defaults: EditConfig) -> tuple[EditSpec, EditConfig]:
    """One JSONL line → (EditSpec, the line's EditConfig). Raises ValueError naming the bad field."""
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
    config = replace(
        defaults,
        mode=rec.get("mode", defaults.mode),
        cross_replace=parse_cross_replace(rec.get("cross_replace"), defaults.cross_replace),
        self_replace=parse_window(rec.get("self_replace", defaults.self_replace)),
        guidance_scale=_optional_float(rec.get("guidance_scale", defaults.guidance_scale)),
    )
    spec = EditSpec(
        target=target,
        mode=config.mode,
        cross_replace_steps=config.cross_replace,
        self_replace_steps=config.self_replace,
        blend_words=blend,
        reweight={k: float(v) for k, v in reweight.items()} if reweight else None,
    )
    return spec, config


def _optional_float(value) -> float | None:
    return float(value) if value is not None else None


class ManifestLookup:
    """image id → inversion path (relative to ``root``) of the finished images of an ``nti invert`` output
    folder, from its manifests (with ``output.subdirs=true`` an image's folder is ``root/ab/<id>/``); the
    manifests are read once, at the first id not found at ``root/<id>/``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[str, str] | None = None

    def __call__(self, image_id: str) -> str | None:
        if self._paths is None:
            from nti_lightning.run import read_manifest

            recs = read_manifest(self.root)
            self._paths = {
                k: r["paths"]["inversion"] for k, r in recs.items() if r.get("status") == "ok" and "paths" in r
            }
        return self._paths.get(image_id)


def resolve_line(root: Path, line: Line, defaults: EditConfig, lookup: ManifestLookup | None = None) -> None:
    """Fills ``line``'s inversion, image id, spec and config (raises ValueError / FileNotFoundError)."""
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
    line.spec, line.config = spec_from_record(rec, defaults)
