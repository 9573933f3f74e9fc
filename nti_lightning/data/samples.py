"""A dataset shard and the ``Item`` of each of its samples: ids, ``SHARD:KEY``, captions, errors.

Shared by the tar reader (``shard_tar``) and the Parquet reader (``shard_parquet``); ``shards`` lists the shards
of the inputs and reads them through these two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from nti_lightning.data.items import CaptionIndex, Item

CAPTION_COLUMNS = ("prompt", "caption", "text")
"""A sample's caption when ``data.caption_column`` is not set: the first of these that exists (Parquet
columns; for a tar sample the fields of its ``.json``, after its ``.txt``)."""
KINDS = ("tar", "parquet")


@dataclass(frozen=True)
class ShardRef:
    """One shard of the input: a WebDataset tar file, or one row group of a Parquet file (``row_group``; None =
    the whole file, used for a file whose footer could not be read when the shards were listed)."""

    kind: str
    """"tar" or "parquet"."""
    path: str
    """The file, as given or found (a folder's entries are joined to the folder as given)."""
    row_group: int | None = None
    """For Parquet, the row group this shard is; None for tar."""
    name: str = ""
    """The prefix of its samples' ids, ``<name>/<key>``: the file's name without ``.tar``/``.parquet``
    (the default). Unique among the shards of a run; the row groups of one file share it."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"shard kind must be one of {KINDS}, got {self.kind!r}")
        if not self.name:
            object.__setattr__(self, "name", shard_stem(self.path))

    @property
    def label(self) -> str:
        """How messages name the shard: its path, and for Parquet the row group."""
        return self.path if self.row_group is None else f"{self.path} (row group {self.row_group})"


def shard_stem(path: str) -> str:
    """``shards/00012.tar`` → ``00012``; ``data/train-00000-of-00004.parquet`` → ``train-00000-of-00004``."""
    name = Path(path).name
    for suffix in (".tar", ".parquet"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def key_path(key: str) -> str:
    """The id path of a sample key: "/"-separated, without root, "." and ".." parts (a tar member named
    ``../x.jpg`` must not put its output outside the output folder)."""
    return "/".join(s for s in key.replace("\\", "/").split("/") if s not in ("", ".", ".."))


class SampleError(ValueError):
    """A sample that cannot be used; the message names ``SHARD:KEY`` and the fix."""


Field = Callable[[str], object]
"""A sample's named value (a tar member's text or a ``.json`` field, a Parquet cell), None when it has none;
raises ``SampleError`` when the value exists but cannot be read."""


@dataclass
class SampleItems:
    """Builds the ``Item`` of each sample of one shard: its id, ``where``, prompt and error."""

    ref: ShardRef
    captions: Mapping[str, list] | None = None
    """``--captions``: rows matched by the sample's id (``<name>/<key>``) or its key; they win."""
    default_prompt: str | None = None
    caption_column: str | None = None

    def ids(self, key: str) -> tuple[str, str]:
        """(id, where) of the sample ``key``: ``<name>/<key>`` and ``SHARD:KEY``."""
        return f"{self.ref.name}/{key_path(key) or '_'}", f"{self.ref.path}:{key}"

    def failed(self, key: str, why: str, item_id: str | None = None) -> Item:
        """A failed sample: ``why`` is the message after ``SHARD:KEY: ``."""
        default_id, where = self.ids(key)
        return Item(item_id or default_id, self.ref.path, None, f"{where}: {why}", where, key=key)

    def item(self, key: str, field: Field, names: tuple[str, ...], missing: str, item_id: str | None = None) -> Item:
        """The sample ``key`` with its prompt: a ``--captions`` row, else the first of ``names`` (the configured
        caption column, or the defaults) that ``field`` has, else ``default_prompt``; else failed with
        ``missing`` (what was looked for). Its image is added by the reader (``data``)."""
        default_id, where = self.ids(key)
        item_id = item_id or default_id
        rows = self._caption_rows(item_id, key)
        if rows is not None:
            if len(set(map(str, rows))) > 1:
                return self.failed(key, f"{len(rows)} different captions in --captions; keep one row", item_id)
            return Item(item_id, self.ref.path, rows[0], None, where, True, key=key)
        try:
            for name in (self.caption_column,) if self.caption_column else names:
                value = field(name)
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise SampleError(
                        f"caption {name!r} holds {type(value).__name__}, not text; set data.caption_column to a "
                        "text field"
                    )
                if value.strip():
                    return Item(item_id, self.ref.path, value.strip(), None, where, key=key)
        except SampleError as e:
            return self.failed(key, str(e), item_id)
        if self.default_prompt is not None:
            return Item(item_id, self.ref.path, self.default_prompt, None, where, key=key)
        fix = "give --captions, or set data.default_prompt"
        return self.failed(key, f"no caption ({missing}); add it, {fix}", item_id)

    def _caption_rows(self, item_id: str, key: str) -> list | None:
        if self.captions is None:
            return None
        keys = (item_id, key)
        if isinstance(self.captions, CaptionIndex):
            return self.captions.first(keys)
        return next((self.captions[k] for k in keys if k in self.captions), None)
