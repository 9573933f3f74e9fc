"""The items of a dataset run: image files, their ids and their captions, streamed with bounded memory.

An input is a folder (searched recursively, each folder's entries sorted by name), an image file, or a list
file (``.jsonl``/``.csv`` rows with ``image`` and an optional ``prompt``, ``.txt`` one path per line; paths
relative to the list file's folder), read line by line: the way to feed 10^7 images without scanning folders.

An item's id is its path relative to the folder it was found in (for a list row: the path as written,
without ``.``/``..``/root parts), without the suffix, with "/" → "__" (a file named directly uses its stem).
Items are produced lazily, in a stable order, so every rank of a multi-process run sees the same sequence and
can shard it statically. What must be remembered across the whole dataset — the captions and the ids seen so
far (duplicates) — lives in private temporary SQLite databases (on disk under ``$TMPDIR``, deleted when
closed; at most ``CACHE_KIB`` of each cached in memory), never in dicts: memory does not grow with the dataset.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
"""What a folder scan takes for an image."""

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "samples"
LIST_SUFFIXES = {".jsonl", ".csv", ".txt"}
"""An input file with one of these suffixes is a list of images, not an image."""
CACHE_KIB = 16 * 1024
"""Page cache of each temporary SQLite index; the rest of the index stays in its temporary file."""


def temp_db() -> sqlite3.Connection:
    """A private temporary SQLite database: on disk (under ``$SQLITE_TMPDIR``/``$TMPDIR``), deleted on close,
    with at most ``CACHE_KIB`` in memory. No journal and no fsync: nothing in it outlives the process. Used by
    one thread at a time; it may be closed (or garbage-collected) from another."""
    db = sqlite3.connect("", check_same_thread=False)
    for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{CACHE_KIB}"):
        db.execute(f"PRAGMA {pragma}")
    return db


@dataclass
class Item:
    id: str
    path: str
    prompt: str | None
    error: str | None = None  # set when the item is known bad before loading (duplicate id, caption problem)
    where: str | None = None  # "LIST:LINE" for an item read from a list file, "SHARD:KEY" for a shard sample
    captioned: bool = False  # its prompt came from the captions file
    data: bytes | None = field(default=None, repr=False)  # a shard sample's encoded image, read with it
    key: str | None = None  # a shard sample's key in its shard (``path``): how it is found again (``shards``)

    @property
    def label(self) -> str:
        """How messages name the item: its path, for a list row the list file and line, for a shard sample
        ``SHARD:KEY``."""
        if self.key is not None:
            return self.where or f"{self.path}:{self.key}"
        return self.path if self.where is None else f"{self.path} ({self.where})"


class CaptionError(ValueError):
    """A captions file that cannot be read; names the file and line."""


class CaptionIndex(Mapping):
    """``{key: [prompts]}`` of a captions file, kept in a temporary SQLite database instead of a dict.

    A read-only mapping (``key in index``, ``index[key]``, ``get``, ``len``, iteration in first-seen order,
    ``==`` with a dict) whose values are the prompts of the key's rows in file order, each as read (JSON
    values keep their type). ``first(keys)`` answers "the rows of the first of these keys present" in one
    query. ``close()`` deletes the database.
    """

    def __init__(self) -> None:
        self._db = temp_db()
        self._db.execute("CREATE TABLE captions (key TEXT NOT NULL, prompt TEXT NOT NULL)")  # prompt as JSON
        self._indexed = False

    def add(self, rows: Iterable[tuple[str, object]]) -> None:
        """Appends (key, prompt) rows; ``rows`` is consumed lazily, in one transaction."""
        self._db.executemany("INSERT INTO captions VALUES (?, ?)", ((k, json.dumps(p)) for k, p in rows))

    def _query(self, sql: str, params: Iterable = ()) -> sqlite3.Cursor:
        if not self._indexed:  # built once after the bulk insert: much faster than maintaining it row by row
            self._db.execute("CREATE INDEX captions_key ON captions (key)")
            self._indexed = True
        return self._db.execute(sql, tuple(params))

    def __getitem__(self, key: str) -> list:
        rows = [
            json.loads(p) for (p,) in self._query("SELECT prompt FROM captions WHERE key = ? ORDER BY rowid", (key,))
        ]
        if not rows:
            raise KeyError(key)
        return rows

    def __contains__(self, key: object) -> bool:
        return self._query("SELECT 1 FROM captions WHERE key = ? LIMIT 1", (key,)).fetchone() is not None

    def __iter__(self) -> Iterator[str]:
        return (k for (k,) in self._query("SELECT key FROM captions GROUP BY key ORDER BY MIN(rowid)"))

    def __len__(self) -> int:
        return self._query("SELECT COUNT(DISTINCT key) FROM captions").fetchone()[0]

    def first(self, keys: Iterable[str]) -> list | None:
        """The prompts of the first of ``keys`` that has rows, else None (``next(index[k] for k in keys if k in
        index)``, in one query)."""
        keys = list(dict.fromkeys(keys))
        sql = f"SELECT key, prompt FROM captions WHERE key IN ({', '.join('?' * len(keys))}) ORDER BY rowid"
        found: dict[str, list] = {}
        for k, p in self._query(sql, keys):
            found.setdefault(k, []).append(json.loads(p))
        return next((found[k] for k in keys if k in found), None)

    def close(self) -> None:
        self._db.close()


def read_captions(path: str | os.PathLike) -> tuple[CaptionIndex, list[str]]:
    """JSONL or CSV with columns ``image`` and ``prompt`` → (index {key: [prompts]}, [warnings]).

    Keys are the ``image`` value as written, normalised with forward slashes. Bad rows become warnings that
    name the file and line; the rest of the file is still used. The file is streamed into a ``CaptionIndex``
    (disk-backed), so its size does not matter.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"captions file {path} does not exist")
    captions = CaptionIndex()
    warnings: list[str] = []

    def row_of(row: object, where: str) -> tuple[str, object] | None:
        if not isinstance(row, dict) or "image" not in row:
            warnings.append(f"{where}: row has no 'image' field; skipped")
            return None
        if isinstance(row.get("prompt"), (dict, list)):
            warnings.append(f"{where}: 'prompt' is a JSON {_json_kind(row['prompt'])}, not a string; skipped")
            return None
        return str(row["image"]).replace("\\", "/"), row.get("prompt")

    def rows() -> Iterator[tuple[str, object]]:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or "image" not in reader.fieldnames or "prompt" not in reader.fieldnames:
                    raise CaptionError(f"{path}: CSV needs a header with columns 'image' and 'prompt'")
                for n, row in enumerate(reader, start=2):
                    if (kv := row_of(row, f"{path}:{n}")) is not None:
                        yield kv
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
                    if (kv := row_of(row, f"{path}:{n}")) is not None:
                        yield kv

    try:
        captions.add(rows())
    except BaseException:
        captions.close()
        raise
    return captions, warnings


def _json_kind(value: object) -> str:
    """How a JSON value is called in messages: "object", "list", "number", "boolean"."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    return "boolean" if isinstance(value, bool) else "number"


def caption_coverage(
    path: str | os.PathLike,
    captions: CaptionIndex,
    n_images: int,
    uncaptioned: int,
    example: str | None,
    default_prompt: str | None,
) -> str | None:
    """One warning when a captions file does not cover the images: it is empty, none of its keys matches an
    image, or some images have no row (``uncaptioned`` of ``n_images``, ``example`` the first one's id)."""
    fallback = f"data.default_prompt ({default_prompt!r})" if default_prompt is not None else "no prompt (they fail)"
    if len(captions) == 0:
        return f"captions file {path} has no usable rows; all {n_images} images get {fallback}"
    if uncaptioned == 0:
        return None
    how = "captions match an image by its path relative to the input folder (with or without suffix), file name or id"
    if uncaptioned == n_images:
        key = next(iter(captions))
        return (
            f"none of the {len(captions)} captions in {path} matches any of the {n_images} images (caption "
            f"{key!r}, image {example!r}): {how}; all get {fallback}"
        )
    return (
        f"{uncaptioned} of {n_images} images have no caption in {path} (e.g. {example!r}; {how}); they get {fallback}"
    )


def _suffix(name: str) -> str:
    """``PurePath(name).suffix`` without building a path."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


class _Entry(NamedTuple):
    """An image found in an input: its path relative to the input's folder (with suffix, "/"-separated), the
    path to open, and for a list row the row's prompt and "LIST:LINE"."""

    rel_path: str
    path: str
    prompt: object = None
    where: str | None = None


def _scan(root: Path, prefix: str = "") -> Iterator[_Entry]:
    """The image files below ``root``, recursively, each folder's entries sorted by name (a stable order on
    every rank). One folder's names (its image files and sub-folders, as strings) are held in memory while it
    is walked — plus those of its parents: for flat folders of millions of files use a list file instead, or
    a tree of sub-folders like the ``ab/`` buckets of ``output.subdirs``."""
    with os.scandir(root) as it:  # a sub-folder's name gets a trailing "/" (never part of a file name)
        names = [
            e.name + "/" if e.is_dir(follow_symlinks=False) else e.name
            for e in it
            if e.is_dir(follow_symlinks=False) or _suffix(e.name).lower() in IMAGE_SUFFIXES
        ]
    names.sort(key=lambda n: n[:-1] if n.endswith("/") else n)
    for name in names:
        if name.endswith("/"):
            yield from _scan(root / name[:-1], prefix + name)
        else:
            yield _Entry(prefix + name, str(root / name))


def _list_rows(path: Path) -> Iterator[_Entry | Item]:
    """The rows of a list file, read line by line (one row per line). A bad row becomes a failed ``Item``
    named ``LIST:LINE`` whose error names the file, the line and the fix; the rest of the file is still read."""
    kind, header = path.suffix.lower(), None
    base = "" if path.parent == Path(".") else str(path.parent)  # os.path.join("", p) == p

    def bad(n: int, why: str) -> Item:
        return Item(f"{path}:{n}", str(path), None, f"{path}:{n}: {why}", f"{path}:{n}")

    try:
        f = open(path, "rb")  # noqa: SIM115  (decoded per line: one bad line is one failed row)
    except OSError as e:
        yield bad(0, f"cannot read the list file ({e.strerror or e}); fix data.images")
        return
    with f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
            except UnicodeDecodeError:
                yield bad(n, "not valid UTF-8; save the list as UTF-8")
                continue
            if not line:
                continue
            prompt = None
            if kind == ".txt":
                image: object = line
            elif kind == ".csv":
                try:
                    cells = next(csv.reader([line]))
                except csv.Error as e:
                    yield bad(n, f"not a valid CSV row ({e}); fix or remove the line")
                    continue
                if header is None:
                    header = [c.strip() for c in cells]
                    if "image" not in header:
                        yield bad(n, "a CSV list needs a header row with a column 'image' (and optionally 'prompt')")
                        return
                    continue
                row = dict(zip(header, cells))
                image, prompt = row.get("image"), row.get("prompt")
            else:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield bad(n, f"not valid JSON ({e.msg}); fix or remove the line")
                    continue
                if not isinstance(row, dict):
                    yield bad(n, 'not a JSON object; write {"image": "PATH", "prompt": "..."}')
                    continue
                image, prompt = row.get("image"), row.get("prompt")
                if prompt is not None and not isinstance(prompt, str):
                    yield bad(n, f"'prompt' is a JSON {_json_kind(prompt)}, not a string; write the prompt as a string")
                    continue
            if not isinstance(image, str) or not image.strip():
                yield bad(n, "no image path in the row; give the image's path (relative to the list's folder)")
                continue
            image = image.strip().replace("\\", "/")
            yield _Entry(image, os.path.join(base, image), prompt, f"{path}:{n}")


def _list_rel(written: str) -> str:
    """The id path of a list row: the path as written without root, "." and ".." parts."""
    return "/".join(s for s in written.split("/") if s not in ("", ".", ".."))


class FileItems:
    """The items of plain inputs (folders, image files, list files), with the ids seen so far kept in a private
    temporary SQLite database so a duplicate id is found across inputs with bounded memory. Close it when done."""

    def __init__(self) -> None:
        self.seen = temp_db()
        self.seen.execute("CREATE TABLE seen (id TEXT PRIMARY KEY, path TEXT NOT NULL) WITHOUT ROWID")
        self.cur = self.seen.cursor()

    def items(self, inp: str, captions: Mapping[str, list] | None, default_prompt: str | None) -> Iterator[Item]:
        """The items of one input, in a stable order: a folder recursively (sorted), a list file's rows, a file."""
        root = Path(inp)
        if root.is_dir():
            found: Iterator[_Entry | Item] = _scan(root)
        elif root.suffix.lower() in LIST_SUFFIXES:
            found = _list_rows(root)
        else:
            found = iter([_Entry(root.name, str(root))])
        for e in found:
            yield e if isinstance(e, Item) else _entry_item(e, self.seen, self.cur, captions, default_prompt)

    def close(self) -> None:
        self.seen.close()


def _entry_item(e: _Entry, seen, cur, captions: Mapping[str, list] | None, default_prompt: str | None) -> Item:
    """The item of a found image: its id from its relative path, a duplicate id refused, its prompt from the list
    row, else the captions (by relative path, path, file name, id), else ``default_prompt``."""
    rel_path = e.rel_path if e.where is None else _list_rel(e.rel_path)
    name = rel_path.rpartition("/")[2]
    suffix = _suffix(name)
    rel = rel_path[: len(rel_path) - len(suffix)] if suffix else rel_path
    item_id = rel.replace("/", "__")
    cur.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (item_id, e.path))
    at = "" if e.where is None else f"{e.where}: "  # a list row's errors name the list and line
    if cur.rowcount == 0:  # recorded under its name with suffix, so it never shadows the first one
        (first,) = seen.execute("SELECT path FROM seen WHERE id = ?", (item_id,)).fetchone()
        error = f"{at}duplicate image id {item_id!r}: also {first}; rename one"
        return Item(rel_path.replace("/", "__"), e.path, None, error, e.where)
    prompt, error, captioned = default_prompt, None, False
    if e.prompt is not None and e.prompt != "":
        prompt = e.prompt
    elif captions is not None:
        keys = (e.rel_path, e.path.replace("\\", "/"), name, rel, item_id)
        if isinstance(captions, CaptionIndex):
            rows = captions.first(keys)
        else:
            rows = next((captions[k] for k in keys if k in captions), None)
        if rows is not None:
            if len(set(rows)) > 1:
                error = f"{at}{len(rows)} different captions for {e.rel_path}; keep one row per image"
            prompt, captioned = rows[0], True
    return Item(item_id, e.path, prompt, error, e.where, captioned)
