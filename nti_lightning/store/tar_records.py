"""Inversion records as WebDataset tar members: the format of the ``shards`` output layout.

A record is consecutive members sharing one key, WebDataset's convention (the key is a member name up to the
first "." of its last part; ``webdataset.tariterators.base_plus_ext``):

* ``<key>.inversion.safetensors`` — the record file's bytes (``store.inversion.inversion_to_bytes``, ∅_t through
  the run's codec), exactly what the ``folders`` layout writes as ``inversion.safetensors``;
* ``<key>.json`` — the image's meta, metrics and id, as the ``folders`` layout's ``meta.json``.

Why tar: a shard is written append-only, each record once and sequentially, so a kill tears at most its tail,
which the writer cuts back (``shard_writer``); ``tar``, ``tarfile``, ``webdataset`` and ``wids`` read it, the same
tooling as the input shards; and a record is found again by the byte offset of its first header (the run's
index keeps it). A zarr array with the sharding codec fits fixed-shape tensors and rewrites shard indexes in
place; a record here is one variable-size file with its JSON, which a tar holds as it is.

The key is derived from the id, never the id itself: "%", "/", "\\" and "." are percent-encoded (injective: the
key has no "." for WebDataset to split on, and no "/" to nest), and a key over ``MAX_KEY_BYTES`` is cut with a
hash of the whole id. The id itself is in the ``.json`` member (and in the record's meta). Member headers are
POSIX pax (``tarfile.PAX_FORMAT``): any UTF-8 name, any length.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

SHARDS_DIR = "shards"
"""Output shards live in ``OUTPUT/shards/``."""
INVERSION_EXT = "inversion.safetensors"
META_EXT = "json"
MAX_KEY_BYTES = 180
"""Longest member key before it is shortened with a hash (tar pax names have no limit; file systems that
extract the shard do)."""
PART = ".part"
"""A shard being written: ``<worker>-<n>.tar.part``, renamed to ``.tar`` once finished."""
SHARD_NAME = re.compile(r"^(?P<worker>.+)-(?P<n>\d{6})\.tar(?P<part>\.part)?$")
_ENCODE = {"%": "%25", "/": "%2F", "\\": "%5C", ".": "%2E"}
_BLOCK = tarfile.BLOCKSIZE


def member_key(item_id: str) -> str:
    """The tar member key of an id (module docstring): injective, no "." or "/", at most ``MAX_KEY_BYTES``."""
    key = "".join(_ENCODE.get(c, c) for c in item_id)
    raw = key.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_KEY_BYTES:
        return key
    digest = hashlib.sha1(item_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{raw[: MAX_KEY_BYTES - 17].decode('utf-8', 'ignore')}~{digest}"


def shard_file(worker: str, n: int) -> str:
    """The finished name of a worker's n-th output shard: ``<worker>-<n:06d>.tar``."""
    return f"{worker}-{n:06d}.tar"


def index_file(shard: str) -> str:
    """The id → offset index beside a finished shard: ``<worker>-<n>.index.json``."""
    return shard[: -len(".tar")] + ".index.json"


def locate_shard(root: Path, worker: str, n: int) -> Path | None:
    """The file of a worker's n-th shard: finished (``.tar``) or being written (``.tar.part``); None if neither."""
    done = Path(root) / SHARDS_DIR / shard_file(worker, n)
    if done.is_file():
        return done
    part = done.with_name(done.name + PART)
    return part if part.is_file() else None


def _pad(n: int) -> int:
    return -n % _BLOCK


def record_parts(key: str, members: list[tuple[str, bytes]], mtime: float) -> list[bytes]:
    """One record as tar pieces, in order: for each (extension, data) a pax header named ``<key>.<extension>``,
    the data, padding to 512 bytes. No end-of-archive blocks (``finish_bytes`` adds them when the shard is
    finished). Pieces, not one ``bytes``: the writer hands them to the file as they are (an SD1.5 record is
    ~2 MB: a join would copy it once more)."""
    out = []
    for ext, data in members:
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
        out += [info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), data, b"\0" * _pad(len(data))]
    return out


def finish_bytes() -> bytes:
    """The end of a tar archive: two zero blocks."""
    return b"\0" * (2 * _BLOCK)


@dataclass
class RecordSpan:
    """Where one record lies in a shard: its first header at ``offset``, its last member's padding ending at
    ``end``; ``members`` maps each extension to (data offset, size)."""

    key: str
    offset: int
    end: int = 0
    members: dict[str, tuple[int, int]] = field(default_factory=dict)


def _split(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, dot, ext = base.partition(".")
    return (name[: len(name) - len(base)] + key, ext) if dot else (name, "")


def scan(f: BinaryIO, start: int = 0, size: int | None = None) -> Iterator[RecordSpan]:
    """The records of an open shard from byte ``start``, in order, from the member headers alone (data is
    seeked past). Stops at the archive's end, at a torn or unreadable header, or before a record whose data
    runs past ``size`` (the file's length: a torn tail). A record whose later members were never written is
    given as it is: the writer trusts only the records the run's index committed."""
    if size is None:
        f.seek(0, 2)
        size = f.tell()
    f.seek(start)
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError:
        return
    span: RecordSpan | None = None
    while True:
        try:
            m = tar.next()
        except tarfile.TarError:
            m = None
        tar.members.clear()  # the TarFile would keep every header
        if m is None:  # the end, or a header torn or unreadable: what came before is whole
            if span is not None:
                yield span
            return
        key, ext = _split(m.name)
        if m.offset_data + m.size > size:  # a member cut short: its record is torn
            if span is not None and key != span.key:
                yield span
            return
        if span is None or key != span.key:
            if span is not None:
                yield span
            span = RecordSpan(key, m.offset)
        span.members[ext] = (m.offset_data, m.size)
        span.end = m.offset_data + m.size + _pad(m.size)


def read_span(f: BinaryIO, offset: int) -> RecordSpan:
    """The record whose first header is at ``offset``; ``ValueError`` when there is none there."""
    for span in scan(f, offset):
        if span.offset == offset:
            return span
        break
    raise ValueError(f"no record at byte {offset}")


def read_member(f: BinaryIO, span: RecordSpan, ext: str) -> bytes:
    """The data of one member of a record (``KeyError`` naming the extension when the record has none)."""
    if ext not in span.members:
        raise KeyError(f"record {span.key!r} at byte {span.offset} has no .{ext} member")
    at, n = span.members[ext]
    f.seek(at)
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"record {span.key!r} at byte {span.offset}: .{ext} is cut short")
    return data
