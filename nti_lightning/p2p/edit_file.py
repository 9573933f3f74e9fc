"""The edits JSONL of ``nti edit OUTPUT --edits FILE``: reading its lines and resolving each to an edit.

A line is ``{"image_id" | "inversion", "target", "mode", "blend", "reweight", "cross_replace",
"self_replace", "guidance_scale"}``; only ``target`` is required. ``mode``, ``cross_replace``,
``self_replace`` and ``guidance_scale`` override the run's ``EditConfig`` (the command line's) for that line.
Every problem is a ValueError / FileNotFoundError naming the field and the fix, so the line fails and the others
go on.

Nothing a line says is joined to a path as written: an ``image_id`` is checked (``data.ids.check_id``) and looked
up among the images the run recorded as done (``recorded_inversions``, through ``nti.open_run``: the one place
that knows how a run records them); an ``inversion`` path must lie inside the output folder (``store.files.inside``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from nti_lightning.data.ids import UnsafeIdError, check_id, printable
from nti_lightning.edit_config import EditConfig, parse_assignments, parse_cross_replace, parse_window
from nti_lightning.p2p.edit import EditSpec
from nti_lightning.store.files import OutsideRootError, inside

CONFIG_KEYS = ("mode", "cross_replace", "self_replace", "guidance_scale")
"""Fields of ``EditConfig`` a line may set."""
EDIT_KEYS = {"image_id", "inversion", "target", "blend", "reweight", *CONFIG_KEYS}


@dataclass
class Line:
    """One line of the edits file and what it resolves to."""

    number: int  # 1-based line in the JSONL
    record: dict
    text: str = ""  # the line's content, canonical (a JSON object with sorted keys), for its record id
    image_id: str = ""
    inversion: Path | RunRecord | None = None  # a file inside the run, or an image it recorded
    spec: EditSpec | None = None
    config: EditConfig | None = None  # the run's, with this line's fields

    @property
    def record_id(self) -> str:
        """The line's id in the job's records: its number and a hash of its content (a changed line is redone)."""
        digest = hashlib.blake2b(self.text.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
        return f"line{self.number:06d}.{digest}"


def read_edit_lines(path: Path) -> Iterator[tuple[int, str, dict | None, str | None]]:
    """(line number, canonical content, record or None, error or None) for every non-blank line, streamed."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                yield n, text.strip(), None, f"not valid JSON ({e.msg}); fix the line: one JSON object per line"
                continue
            if not isinstance(rec, dict):
                yield n, text.strip(), None, 'not a JSON object; give {"image_id": ..., "target": ...}'
                continue
            yield n, json.dumps(rec, sort_keys=True, ensure_ascii=False), rec, None


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


@dataclass(frozen=True)
class RunRecord:
    """An image the run recorded as done, in any layout (its own file, a record in an output shard): read through
    ``nti.open_run``. ``where`` names it for messages (``shards/<file>@<offset>``, or the file)."""

    image_id: str
    where: str

    @property
    def name(self) -> str:
        return self.where

    @property
    def parent(self) -> Path:
        return Path(self.where).parent


class RecordedInversions:
    """image id → ``RunRecord`` of that finished image of the ``nti invert`` run in ``root`` (None: not recorded as
    done), through ``nti.open_run`` (opened at the first lookup): the one lookup of ids in the edit job. An id is
    looked up among the recorded ones, never joined to a path."""

    def __init__(self, root: Path) -> None:
        self.root, self._run = Path(root), None

    @property
    def run(self):
        if self._run is None:
            from nti_lightning.store.reader import open_run

            self._run = open_run(self.root)
        return self._run

    def __call__(self, image_id: str) -> RunRecord | None:
        return RunRecord(image_id, self.run.locate(image_id)) if image_id in self.run else None

    def load(self, source: Path | RunRecord, model=None):
        """The inversion of a line's source (a file inside the run, or a recorded image), checked as
        ``load_inversion`` checks a file."""
        if isinstance(source, RunRecord):
            return self.run.load(source.image_id, model)
        from nti_lightning.store.inversion import load_inversion

        return load_inversion(source, model)


def recorded_inversions(root: Path) -> RecordedInversions:
    return RecordedInversions(root)


def resolve_line(root: Path, line: Line, defaults: EditConfig, lookup: Callable[[str], Path | None]) -> None:
    """Fills ``line``'s inversion, image id, spec and config (raises ValueError / FileNotFoundError with the fix)."""
    rec = line.record
    if "image_id" in rec:
        line.image_id = _checked_id(rec["image_id"])
    if "inversion" in rec:
        if not isinstance(rec["inversion"], str) or not rec["inversion"]:
            raise ValueError('"inversion" must be a path (a string) inside the output folder')
        try:
            line.inversion = inside(root, rec["inversion"])
        except OutsideRootError:
            raise ValueError(
                f'"inversion" {rec["inversion"]!r} is outside the output folder {root}; give a path inside it '
                '(relative to it, e.g. "images/cat/inversion.safetensors"), or the image\'s "image_id"'
            ) from None
    elif "image_id" in rec:
        line.inversion = lookup(line.image_id)
        if line.inversion is None:
            raise FileNotFoundError(
                f"image id {line.image_id!r} is not among the images {root} recorded as done; fix the id "
                f"(`nti status {root}` lists the run) or invert the image first"
            )
    else:
        raise ValueError('give "image_id" (an image of the output folder) or "inversion" (a file inside it)')
    if isinstance(line.inversion, Path) and not line.inversion.is_file():
        raise FileNotFoundError(f"no inversion at {line.inversion}; fix the path or invert the image again")
    line.spec, line.config = spec_from_record(rec, defaults)


def _checked_id(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f'"image_id" must be a string, got {type(value).__name__}')
    try:
        return check_id(value)
    except UnsafeIdError:
        raise ValueError(
            f'"image_id" {printable(value)!r} is not an image id (empty, "." or ".." parts, control characters or '
            'over 1024 bytes); give the id as `nti invert` recorded it (its manifest\'s "id")'
        ) from None
