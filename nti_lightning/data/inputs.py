"""Every input of a run as one stream of items: plain inputs (``items``) and tar/Parquet shards (``shards``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from nti_lightning.data import shards
from nti_lightning.data.items import FileItems, Item


def iter_items(
    inputs: list[str],
    captions: Mapping[str, list] | None,
    default_prompt: str | None = None,
    caption_column: str | None = None,
    image_column: str | None = None,
) -> Iterator[Item]:
    """Items in input order: folders recursively (sorted), files, and the rows of list files (``.jsonl`` /
    ``.csv`` with ``image`` and optional ``prompt``; ``.txt`` one path per line; relative to the list's
    folder). A list row's prompt wins; otherwise captions are looked up by relative path, path with suffix,
    file name and id; otherwise ``default_prompt``. Duplicate ids, ambiguous captions and bad list rows become
    items with an error. Lazy: nothing is read ahead, and the ids seen so far are kept in a temporary SQLite
    database, so memory does not grow with the number of items. Image files are not opened or checked here.

    Tar and Parquet shards (``.tar``/``.parquet`` files, brace patterns, folders of shards; see
    ``nti_lightning.data.shards``) give their samples in shard order, each with its image bytes (``Item.data``),
    its caption from the sample (``caption_column``) unless ``captions`` has a row for it, and the id
    ``<shard name>/<key>``."""
    files = FileItems()
    shard_names: dict[str, set] = {}  # the shards of earlier inputs: a shard's ids never collide
    try:
        for inp in inputs:
            if shards.is_shard_input(inp):  # its ids hold a "/", a file's never do: no check against the files'
                refs = shards.list_shards([inp], image_column)
                shards.check_names(refs, shard_names)
                for ref in refs:
                    yield from shards.iter_shard(ref, captions, default_prompt, caption_column, None, image_column)
            else:
                yield from files.items(inp, captions, default_prompt)
    finally:
        files.close()
