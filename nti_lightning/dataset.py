"""The items of a dataset run: image files, their ids and their captions.

An item's id is its path relative to the folder it was found in, without the suffix, with "/" → "__"
(a file named directly uses its stem). Items are produced lazily, in a stable sorted order, so every rank
of a multi-process run sees the same sequence and can shard it statically.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nti_lightning.image import IMAGE_SUFFIXES

SAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "samples"


@dataclass
class Item:
    id: str
    path: str
    prompt: str | None
    error: str | None = None  # set when the item is known bad before loading (duplicate id, caption problem)


class CaptionError(ValueError):
    """A captions file that cannot be read; names the file and line."""


def read_captions(path: str | os.PathLike) -> tuple[dict[str, list[str]], list[str]]:
    """JSONL or CSV with columns ``image`` and ``prompt`` → ({key: [prompts]}, [warnings]).

    Keys are the ``image`` value as written, normalised with forward slashes. Bad rows become warnings that
    name the file and line; the rest of the file is still used.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"captions file {path} does not exist")
    captions: dict[str, list[str]] = {}
    warnings: list[str] = []

    def add(row: object, where: str) -> None:
        if not isinstance(row, dict) or "image" not in row:
            warnings.append(f"{where}: row has no 'image' field; skipped")
            return
        prompt = row.get("prompt")
        captions.setdefault(str(row["image"]).replace("\\", "/"), []).append(prompt)

    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "image" not in reader.fieldnames or "prompt" not in reader.fieldnames:
                raise CaptionError(f"{path}: CSV needs a header with columns 'image' and 'prompt'")
            for n, row in enumerate(reader, start=2):
                add(row, f"{path}:{n}")
    else:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    warnings.append(f"{path}:{n}: not valid JSON ({e.msg}); skipped")
                    continue
                add(row, f"{path}:{n}")
    return captions, warnings


def _scan(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative id, path) for image files below ``root``, recursively, sorted."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    for e in entries:
        p = Path(e.path)
        if e.is_dir(follow_symlinks=False):
            yield from _scan(p)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            yield p.relative_to(root).with_suffix("").as_posix(), p


def iter_items(
    inputs: list[str], captions: dict[str, list[str]] | None, default_prompt: str | None = None
) -> Iterator[Item]:
    """Items in input order (folders recursively, sorted). Captions are looked up by relative path,
    path with suffix, file name and id. Duplicate ids and ambiguous captions become items with an error."""
    seen: dict[str, str] = {}
    for inp in inputs:
        root = Path(inp)
        if root.is_dir():
            found = ((rel, p, root) for rel, p in _scan(root))
        else:
            found = iter([(root.stem, root, root.parent)])
        for rel, p, base in found:
            item_id = rel.replace("/", "__")
            if item_id in seen:  # recorded under its name with suffix, so it never shadows the first one
                dup_id = p.relative_to(base).as_posix().replace("/", "__") if p.is_relative_to(base) else p.name
                yield Item(dup_id, str(p), None, f"duplicate image id {item_id!r}: also {seen[item_id]}; rename one")
                continue
            seen[item_id] = str(p)
            prompt, error = default_prompt, None
            if captions is not None:
                rel_path = p.relative_to(base).as_posix() if p.is_relative_to(base) else p.name
                keys = (rel_path, str(p).replace("\\", "/"), p.name, rel, item_id)
                rows = next((captions[k] for k in keys if k in captions), None)
                if rows is not None:
                    if len(set(rows)) > 1:
                        error = f"{len(rows)} different captions for {rel_path}; keep one row per image"
                    prompt = rows[0]
            yield Item(item_id, str(p), prompt, error)
