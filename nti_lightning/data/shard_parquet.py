"""Parquet shards (Hugging Face datasets): an image column of ``{bytes, path}`` structs (or raw bytes) and a
text column, read with ``pyarrow.parquet.ParquetFile`` one row group at a time.

A sample's key is its ``key`` column when the file has one (img2dataset, WebDataset conversions), else its
row number in the file (0-based, counted across row groups): ids do not depend on how the file is cut into
row groups. The small columns (key, caption) of a row group are read first; the image column is read in
batches of ``BATCH_ROWS`` rows, and not at all when every row of the row group is skipped or failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nti_lightning.data.image import ImageError
from nti_lightning.data.items import Item
from nti_lightning.data.samples import CAPTION_COLUMNS, SampleItems, ShardRef

KEY_COLUMN = "key"
"""A column of this name gives the samples' keys (else the row number in the file)."""
BATCH_ROWS = 64
"""Rows of the image column decoded from Parquet at a time: bounds the memory of a large row group."""
READ_ERRORS = (OSError, pa.ArrowException)


def _is_image_type(t: pa.DataType) -> bool:
    """A Hugging Face ``Image`` struct (a binary field ``bytes``), or a binary column."""
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return i >= 0 and _is_binary(t.field(i).type)
    return _is_binary(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def find_image_column(schema: pa.Schema, wanted: str | None, path: str) -> str | None:
    """The image column: ``wanted`` (``data.image_column``), else ``image``, else the only image-typed column;
    None when there is none. Raises ``ValueError`` for a named column that is missing or not an image, and
    for several candidates without a name."""
    found = [f.name for f in schema if _is_image_type(f.type)]
    if wanted is not None:
        if wanted not in schema.names:
            raise ValueError(
                f"{path}: no column {wanted!r} (columns: {', '.join(schema.names)}); fix data.image_column"
            )
        if wanted not in found:
            raise ValueError(f"{path}: column {wanted!r} holds {schema.field(wanted).type}, not image bytes")
        return wanted
    if "image" in found or len(found) <= 1:
        return "image" if "image" in found else (found[0] if found else None)
    raise ValueError(f"{path}: several image columns ({', '.join(found)}); choose one with data.image_column")


def parquet_size(ref: ShardRef) -> int:
    """The number of items ``iter_parquet`` yields without ``skip``: the row group's rows (from the footer),
    1 for a file that cannot be read."""
    try:
        meta = pq.ParquetFile(ref.path).metadata
    except READ_ERRORS:
        return 1
    return meta.num_rows if ref.row_group is None else meta.row_group(ref.row_group).num_rows


def iter_parquet(
    ref: ShardRef,
    items: SampleItems,
    skip: Callable[[str], bool] | None = None,
    image_col: str | None = None,
) -> Iterator[Item]:
    """One ``Item`` per row of the row group ``ref`` (every row group for ``row_group=None``), in row order
    (see ``shards.iter_shard``); ``image_col`` is ``data.image_column``."""
    try:
        pf = pq.ParquetFile(ref.path)
        column = find_image_column(pf.schema_arrow, image_col, ref.path)
    except (*READ_ERRORS, ValueError) as e:
        bad = items.failed("unreadable", f"cannot read the Parquet file ({e}); re-download or re-write it")
        if skip is None or not skip(bad.id):
            yield bad
        return
    if column is None:
        bad = items.failed("unreadable", "no image column (a {bytes, path} struct or binary); set data.image_column")
        if skip is None or not skip(bad.id):
            yield bad
        return
    groups = range(pf.metadata.num_row_groups) if ref.row_group is None else [ref.row_group]
    for rg in groups:
        yield from _row_group(pf, rg, column, items, skip)


def _caption_column(pf: pq.ParquetFile, items: SampleItems) -> str | None:
    names = pf.schema_arrow.names
    if items.caption_column:
        return items.caption_column if items.caption_column in names else None
    return next((c for c in CAPTION_COLUMNS if c in names), None)


def _row_group(
    pf: pq.ParquetFile, rg: int, column: str, items: SampleItems, skip: Callable[[str], bool] | None
) -> Iterator[Item]:
    """The rows of one row group: (1) keys and captions, (2) which rows are to do, (3) their image bytes."""
    meta, names = pf.metadata, pf.schema_arrow.names
    first = sum(meta.row_group(i).num_rows for i in range(rg))  # row number of the group's first row
    n = meta.row_group(rg).num_rows
    caption = _caption_column(pf, items)
    small = [c for c in (KEY_COLUMN, caption) if c is not None and c in names and c != column]
    # 1. keys and captions
    try:
        table = pf.read_row_group(rg, columns=small) if small else None
    except READ_ERRORS as e:
        for j in range(n):  # keys unknown: row numbers
            yield items.failed(str(first + j), f"row group {rg} cannot be read ({e}); re-download or re-write it")
        return
    keys = table.column(KEY_COLUMN).to_pylist() if KEY_COLUMN in small else [None] * n
    texts = table.column(caption).to_pylist() if caption in small else None
    if items.caption_column and caption is None:
        looked = f"no column {items.caption_column!r} (data.caption_column); columns: {', '.join(names)}"
    elif caption is None:
        looked = f"no prompt/caption/text column; columns: {', '.join(names)}; set data.caption_column"
    else:
        looked = f"column {caption!r} is empty"
    # 2. the rows to do, with their prompts
    todo: dict[int, Item] = {}
    seen: dict[str, int] = {}
    for j in range(n):
        key = str(first + j) if keys[j] is None else str(keys[j])
        item_id, _ = items.ids(key)
        at = seen.setdefault(item_id, first + j)
        if at != first + j:
            item_id = f"{item_id}@{first + j}"
        if skip is not None and skip(item_id):
            continue
        if at != first + j:
            todo[j] = items.failed(key, f"key {key!r} appears twice (also row {at}); keep one row per key", item_id)
            continue
        text = texts[j] if texts is not None else None  # the row's only caption field: its caption column's cell
        todo[j] = items.item(key, lambda _name, t=text: t, (caption or "",), looked, item_id)
    # 3. their image bytes, in row order
    need = {j for j, it in todo.items() if it.error is None}
    values = _image_bytes(pf, rg, column, need) if need else iter(())
    for j, it in todo.items():
        if j in need:
            got = next(values)
            if isinstance(got, Exception):
                it = items.failed(it.key, f"row group {rg} cannot be read ({got}); re-download or re-write it", it.id)
            elif isinstance(got, str):
                it = items.failed(it.key, got, it.id)
            else:
                it.data = got
        yield it


def _image_bytes(pf: pq.ParquetFile, rg: int, column: str, need: set[int]) -> Iterator[bytes | str | Exception]:
    """For each row in ``need``, in order: its image bytes, a message (no bytes), or the read error."""
    j, left = 0, len(need)
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], columns=[column]):
            arr = batch.column(0)
            data = arr.field("bytes") if pa.types.is_struct(arr.type) else arr
            paths = (
                arr.field("path") if pa.types.is_struct(arr.type) and arr.type.get_field_index("path") >= 0 else None
            )
            for i in range(len(batch)):
                if j + i in need:
                    value = data[i].as_py()
                    if value is None:
                        p = paths[i].as_py() if paths is not None else None
                        also = f" (only a path, {p!r}: store the images' bytes in the file)" if p else ""
                        value = f"no image bytes in column {column!r}{also}"
                    left -= 1
                    yield value
            j += len(batch)
    except READ_ERRORS as e:
        for _ in range(left):
            yield e
        return


def read_parquet_sample(path: str, key: str, image_col: str | None = None) -> bytes:
    """The image bytes of the row ``key`` of a Parquet file, found again (a resumed item)."""
    try:
        pf = pq.ParquetFile(path)
        column = find_image_column(pf.schema_arrow, image_col, path)
        if column is None:
            raise ValueError("no image column")
        if KEY_COLUMN in pf.schema_arrow.names:
            keys = pf.read(columns=[KEY_COLUMN]).column(KEY_COLUMN).to_pylist()
            row = next((r for r, k in enumerate(keys) if k is not None and str(k) == key), None)
            row = int(key) if row is None and key.isdigit() and keys[int(key)] is None else row
        else:
            row = int(key) if key.isdigit() else None
        if row is None or row >= pf.metadata.num_rows:
            raise ValueError("no such row")
        rg, first = 0, 0
        while first + pf.metadata.row_group(rg).num_rows <= row:
            first += pf.metadata.row_group(rg).num_rows
            rg += 1
        got = next(_image_bytes(pf, rg, column, {row - first}))
    except (*READ_ERRORS, ValueError, IndexError) as e:
        raise ImageError(f"{path}:{key}: cannot be read again ({e})") from None
    if not isinstance(got, bytes):
        raise ImageError(f"{path}:{key}: {got}")
    return got
