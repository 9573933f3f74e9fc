"""Dataset shards as inputs: WebDataset tar shards and Parquet files, listed, counted and read sample by sample.

The interface of the run layer: ``list_shards`` (the inputs → a stable list of ``ShardRef``, the same on every
rank, split among ranks and array tasks by shard), ``shard_size`` (a shard's number of items, cheaply),
``iter_shard`` (its items in shard order, image bytes in ``Item.data``, nothing of a skipped one read) and
``read_sample`` (an item's image bytes found again, for an item restored from a checkpoint).

Inputs, in order:
- a brace pattern, the WebDataset convention (``shards/{00000..00999}.tar``, ``{a,b}.parquet``), expanded with
  ``braceexpand``: every shard it names must exist;
- a ``.tar`` file; a ``.parquet`` file (one shard per row group: a single large file still splits across
  workers, and a row group is what ``pyarrow`` reads on its own);
- a folder that directly holds ``.tar`` or ``.parquet`` files (not its sub-folders), sorted by name. A folder
  that holds ``.tar`` files is read as tar shards only: its ``.parquet`` files are img2dataset's per-shard
  metadata (no image bytes) and are left out with one log line. In a folder of Parquet files only, a file
  without an image column is left out with one log line (named directly, it is an error).

A sample's id is ``<shard name>/<key>``, the shard name being the file's name without ``.tar``/``.parquet``
(unique among the shards: two shards of one name are an error). Messages name a sample ``SHARD:KEY`` (the
shard's path and the key). A bad sample (no image, two images for one key, no caption and no default prompt,
a key seen twice, a member cut short) is an item with ``error`` set and the shard goes on; a corrupt tar is one
failed item naming the byte offset, after which the rest of that shard cannot be read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping

import pyarrow.parquet as pq
from braceexpand import UnbalancedBracesError, braceexpand

from nti_lightning.data.items import Item
from nti_lightning.data.samples import SampleItems, ShardRef
from nti_lightning.data.shard_parquet import (
    READ_ERRORS,
    find_image_column,
    iter_parquet,
    parquet_size,
    read_parquet_sample,
)
from nti_lightning.data.shard_tar import iter_tar, read_tar_sample, tar_size

log = logging.getLogger(__name__)
_warned: set[str] = set()  # each "not read" line once per process, not once per listing


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


SHARD_SUFFIXES = {".tar": "tar", ".parquet": "parquet"}


def _kind(path: str) -> str | None:
    return SHARD_SUFFIXES.get(os.path.splitext(path)[1].lower())


def _braces(inp: str) -> list[str]:
    """The paths a brace pattern names; ``[inp]`` for a plain path (or unbalanced braces: a literal name)."""
    try:
        return list(braceexpand(inp))
    except UnbalancedBracesError:
        return [inp]


def is_shard_pattern(inp: str) -> bool:
    """A brace pattern naming several files (``shards/{00000..00009}.tar``), not an existing path."""
    return not os.path.exists(inp) and _braces(inp) != [inp]


def _shard_files(folder: str) -> list[str]:
    """The ``.tar`` and ``.parquet`` files directly in ``folder``, sorted by name."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if _kind(e.name) is not None and e.is_file())


def is_shard_input(inp: str) -> bool:
    """Whether ``inp`` is read as shards: a brace pattern, a ``.tar``/``.parquet`` file, or a folder that
    directly holds such files (any other folder is a folder of image files)."""
    if os.path.isdir(inp):
        return bool(_shard_files(inp))
    return _kind(inp) is not None or is_shard_pattern(inp)


def _parquet_refs(path: str, wanted: str | None, named: bool) -> list[ShardRef]:
    """One ref per row group; one for the whole file when its footer cannot be read (it fails as one item)."""
    try:
        pf = pq.ParquetFile(path)
    except READ_ERRORS:
        return [ShardRef("parquet", path)]
    column = find_image_column(pf.schema_arrow, wanted, path)
    if column is None:
        why = f"{path} has no image column (columns: {', '.join(pf.schema_arrow.names)})"
        if named:
            raise ValueError(f"{why}; give a Parquet file with image bytes, or set data.image_column")
        _warn_once(f"{why}: not read as images")
        return []
    return [ShardRef("parquet", path, rg) for rg in range(pf.metadata.num_row_groups)]


def _refs(path: str, wanted: str | None, named: bool) -> list[ShardRef]:
    kind = _kind(path)
    if kind is None or not os.path.isfile(path):
        raise ValueError(f"{path} is not a .tar or .parquet shard; give shard files, a folder of them or a pattern")
    return [ShardRef("tar", path)] if kind == "tar" else _parquet_refs(path, wanted, named)


def _expand(inp: str, wanted: str | None) -> list[ShardRef]:
    """The shards of one input (see the module docstring)."""
    if os.path.isdir(inp):
        names = _shard_files(inp)
        tars = [n for n in names if _kind(n) == "tar"]
        if tars and len(tars) < len(names):
            _warn_once(
                f"{inp}: {len(names) - len(tars)} .parquet file(s) beside its .tar shards are not read (img2dataset's "
                "metadata); name a Parquet file to read it"
            )
        if tars:
            return [ShardRef("tar", os.path.join(inp, n)) for n in tars]
        return [r for n in names for r in _parquet_refs(os.path.join(inp, n), wanted, named=False)]
    if os.path.exists(inp):
        return _refs(inp, wanted, named=True)
    paths = _braces(inp)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        if paths == [inp]:
            raise FileNotFoundError(f"input {inp} does not exist; fix --images (or data.images)")
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} shards of {inp} do not exist (the first: {missing[0]}); fix the "
            "pattern, or give the folder to read the shards that are there"
        )
    return [r for p in paths for r in _refs(p, wanted, named=True)]


def list_shards(inputs: list[str], image_column: str | None = None) -> list[ShardRef]:
    """The shards of ``inputs``, in input order and each input's own order (pattern order, folder entries sorted
    by name, row groups in file order): the same list on every rank. ``image_column`` is ``data.image_column``.
    Raises ``FileNotFoundError``/``ValueError`` naming the input and the fix (a missing shard, two shards of
    one name, a named Parquet file without image bytes)."""
    refs = [r for inp in inputs for r in _expand(inp, image_column)]
    check_names(refs)
    return refs


def check_names(refs: list[ShardRef], seen: dict[str, set] | None = None) -> None:
    """Raises ``ValueError`` when two shards share a name (their ids would collide) or one is listed twice;
    ``seen`` (name → {(path, row group)}, filled in) carries the shards of earlier inputs."""
    seen = {} if seen is None else seen
    for r in refs:
        here, listed = (_same(r.path), r.row_group), seen.setdefault(r.name, set())
        other = next((p for p, _ in listed if p != here[0]), None)
        if other is not None:
            raise ValueError(
                f"two shards named {r.name!r}: {other} and {r.path}; their ids (<name>/<key>) would collide: rename "
                "one or run them apart"
            )
        if here in listed:
            raise ValueError(f"shard {r.label} is listed twice; give each shard once")
        listed.add(here)


def _same(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def shard_size(ref: ShardRef) -> int:
    """The number of items ``iter_shard(ref)`` yields (without ``skip``), cheaply: for tar, the samples counted
    from the member headers alone (each header is read, each member's data seeked past); for Parquet, the row
    group's ``num_rows`` from the footer. A corrupt or unreadable shard counts its one failed item."""
    return tar_size(ref.path) if ref.kind == "tar" else parquet_size(ref)


def iter_shard(
    ref: ShardRef,
    captions: Mapping[str, list] | None = None,
    default_prompt: str | None = None,
    caption_column: str | None = None,
    skip: Callable[[str], bool] | None = None,
    image_column: str | None = None,
) -> Iterator[Item]:
    """One ``Item`` per sample of ``ref``, in shard order: ``id = <ref.name>/<key>``, ``where = SHARD:KEY``,
    ``key``, the encoded image in ``data``, and the prompt: a ``captions`` row matched by id or key, else the
    sample's caption (``caption_column``, by default a tar sample's ``.txt`` then ``prompt``/``caption``/
    ``text`` of its ``.json``; a Parquet file's first ``prompt``/``caption``/``text`` column), else
    ``default_prompt``. A bad sample has ``error`` set (``SHARD:KEY: what; the fix``) and no data.
    ``skip(id)`` → True: the sample is done; it is not yielded and its image is not read (for tar its members
    are seeked past; for Parquet the image column of a row group whose rows are all skipped is not read)."""
    items = SampleItems(ref, captions, default_prompt, caption_column)
    if ref.kind == "tar":
        yield from iter_tar(ref, items, skip)
    else:
        yield from iter_parquet(ref, items, skip, image_column)


def read_sample(item: Item, image_column: str | None = None) -> bytes:
    """The encoded image of a shard item found again in its shard (``item.path``, ``item.key``): for an item
    restored without its bytes (a checkpoint holds no image bytes). Raises ``ImageError`` naming ``SHARD:KEY``."""
    if _kind(item.path) == "parquet":
        return read_parquet_sample(item.path, item.key, image_column)
    return read_tar_sample(item.path, item.key)
