"""WebDataset tar shards (the layout img2dataset writes): ``KEY.jpg|png|webp`` + ``KEY.txt`` + ``KEY.json``.

A sample is a run of consecutive regular members that share a key, split from their names by WebDataset's
own rule (``webdataset.tariterators.base_plus_ext``: the key is the name up to the first "." of its last
part; names without one, and WebDataset's ``__meta__`` names, are not samples).

The members are walked with ``tarfile`` opened for random access, not with
``webdataset.tariterators.tar_file_iterator``: that one opens the shard as a stream and hides the
``TarFile``, so it gives no member offsets, reads every member's bytes (a skipped sample's too), and ends
*silently* at a corrupt header in the middle of a shard (``tarfile`` takes it for the end of the archive;
pinned in ``tests/data/test_shards.py``). Here a skipped sample's members are seeked past, unread; counting
the samples (``tar_size``) reads headers only; and where ``tarfile`` stops, the 512 bytes it stopped at are
checked: a zero block is the end of the archive, anything else is corruption at that byte offset.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from webdataset.tariterators import base_plus_ext

from nti_lightning.data.image import ImageError
from nti_lightning.data.items import IMAGE_SUFFIXES, Item
from nti_lightning.data.samples import CAPTION_COLUMNS, SampleError, SampleItems, ShardRef

IMAGE_EXTENSIONS = {s[1:] for s in IMAGE_SUFFIXES}
"""A member whose whole extension is one of these is the sample's image (``jpg``, ``png``, ``webp``, …)."""
TAR_CAPTION_FIELDS = ("txt", *CAPTION_COLUMNS)
"""Where a tar sample's caption is looked for by default: ``KEY.txt``, then ``prompt``/``caption``/``text``
(a member with that extension, else that field of ``KEY.json``)."""
META_NAME = re.compile(r"__[^/]*__($|/)")  # WebDataset's skip_meta: "__key__"-style names are not samples


@dataclass
class _Group:
    """The members of one sample, in shard order; ``offset`` is its first header's byte offset."""

    key: str
    offset: int
    members: list[tarfile.TarInfo] = field(default_factory=list)
    cut: int | None = None  # the byte offset of a corruption right after it: members of it may be lost


@dataclass
class _Corrupt:
    """Where the shard stops being readable: the byte offset of the bad header (or 0: not a tar)."""

    offset: int
    why: str


def _walk(tar: tarfile.TarFile) -> Iterator[_Group | _Corrupt]:
    """The samples of an open tar, from its headers only; a ``_Corrupt`` last if it does not end cleanly."""
    group: _Group | None = None
    while True:
        try:
            m = tar.next()
        except tarfile.TarError as e:  # a member's data cut short, a bad extended header
            corrupt: _Corrupt | None = _Corrupt(tar.offset, str(e))
            m = None
        else:
            corrupt = None if m is not None else _end_check(tar)
        if m is None:
            if group is not None:
                group.cut = corrupt.offset if corrupt is not None else None
                yield group
            if corrupt is not None:
                yield corrupt
            return
        tar.members.clear()  # the TarFile would keep every member: memory would grow with the shard
        if not m.isreg() or META_NAME.match(m.name):
            continue
        key, _ = base_plus_ext(m.name)
        if key is None:
            continue
        if group is None or key != group.key:
            if group is not None:
                yield group
            group = _Group(key, m.offset)
        group.members.append(m)


def _end_check(tar: tarfile.TarFile) -> _Corrupt | None:
    """``tarfile`` returned no next member: None at a clean end (a zero block, or the file's end), else the
    corruption it took for the end of the archive."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if not block.strip(b"\0"):
        return None
    why = "invalid tar header" if len(block) == tarfile.BLOCKSIZE else "the file ends inside a tar header"
    return _Corrupt(tar.offset, why)


def _open(path: str) -> tarfile.TarFile | _Corrupt:
    try:
        return tarfile.open(path, mode="r:")
    except tarfile.TarError as e:
        return _Corrupt(0, f"not a readable tar file ({e})")
    except OSError as e:
        return _Corrupt(0, f"cannot open it ({e.strerror or e})")


def tar_size(path: str) -> int:
    """The number of items ``iter_tar`` yields for this shard without ``skip``: its samples (member headers
    only, no data read), plus one for a corrupt or unreadable shard."""
    tar = _open(path)
    if isinstance(tar, _Corrupt):
        return 1
    with tar:
        return sum(1 for _ in _walk(tar))


def _corrupt_item(items: SampleItems, c: _Corrupt) -> Item:
    what = "the shard" if c.offset == 0 else "the rest of the shard"
    why = f"{c.why} at byte {c.offset}; {what} cannot be read: re-create or re-download it"
    return items.failed(f"corrupt-at-byte-{c.offset}", why)


def iter_tar(ref: ShardRef, items: SampleItems, skip: Callable[[str], bool] | None = None) -> Iterator[Item]:
    """One ``Item`` per sample of the tar shard ``ref``, in shard order (see ``shards.iter_shard``)."""
    tar = _open(ref.path)
    if isinstance(tar, _Corrupt):
        if skip is None or not skip(_corrupt_item(items, tar).id):
            yield _corrupt_item(items, tar)
        return
    with tar:
        first_at: dict[str, int] = {}  # id → byte offset of its sample: this shard's keys only
        for g in _walk(tar):
            if isinstance(g, _Corrupt):
                bad = _corrupt_item(items, g)
                if skip is None or not skip(bad.id):
                    yield bad
                continue
            item_id, _ = items.ids(g.key)
            seen_at = first_at.setdefault(item_id, g.offset)
            if seen_at != g.offset:  # the key again, further on: its own id, so it never shadows the first
                item_id = f"{item_id}@{g.offset}"
            if skip is not None and skip(item_id):
                continue  # nothing of it is read
            if seen_at != g.offset:
                why = f"key {g.key!r} appears twice in the shard (also at byte {seen_at}); keep one sample per key"
                yield items.failed(g.key, why, item_id)
                continue
            item = _sample(tar, g, items, item_id)
            if item.error is not None and g.cut is not None:
                item.error += f" (the shard is corrupt right after it, at byte {g.cut}: members of it may be lost)"
            yield item


def _sample(tar: tarfile.TarFile, g: _Group, items: SampleItems, item_id: str) -> Item:
    """The item of one sample: its caption, then its image bytes (not read when it fails anyway)."""
    by_ext: dict[str, list[tarfile.TarInfo]] = {}
    for m in g.members:
        by_ext.setdefault(base_plus_ext(m.name)[1].lower(), []).append(m)
    twice = sorted(e for e, ms in by_ext.items() if len(ms) > 1)
    images = sorted(e for e in by_ext if e in IMAGE_EXTENSIONS)
    found = ", ".join(f".{e}" for e in by_ext)
    if twice:
        return items.failed(g.key, f"member {g.key}.{twice[0]} appears twice; keep one", item_id)
    if not images:
        return items.failed(g.key, f"no image member (found {found}); add {g.key}.jpg/.png/.webp", item_id)
    if len(images) > 1:
        return items.failed(g.key, f"{len(images)} images for one key ({found}); keep one image per key", item_id)
    cache: dict[str, object] = {}

    def read(ext: str) -> bytes:
        m = by_ext[ext][0]
        try:
            return tar.extractfile(m).read()
        except (tarfile.TarError, OSError) as e:
            raise SampleError(f"member {m.name} cannot be read ({e}; the shard is cut short): re-download it") from None

    def member_field(name: str) -> object:
        if name in by_ext and name not in IMAGE_EXTENSIONS:
            try:
                return read(name).decode("utf-8")
            except UnicodeDecodeError:
                raise SampleError(f"{g.key}.{name} is not valid UTF-8; save it as UTF-8") from None
        if "json" not in by_ext:
            return None
        if "json" not in cache:
            try:
                cache["json"] = json.loads(read("json"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SampleError(f"{g.key}.json is not valid JSON ({e}); fix it or add {g.key}.txt") from None
        meta = cache["json"]
        return meta.get(name) if isinstance(meta, dict) else None

    names = TAR_CAPTION_FIELDS
    looked = (
        f"no {g.key}.{items.caption_column} and no {items.caption_column!r} in {g.key}.json (data.caption_column)"
        if items.caption_column
        else f"no {g.key}.txt and no prompt/caption/text in {g.key}.json"
    )
    item = items.item(g.key, member_field, names, looked, item_id)
    if item.error is None:
        try:
            item.data = read(images[0])
        except SampleError as e:
            return items.failed(g.key, str(e), item_id)
    return item


def read_tar_sample(path: str, key: str) -> bytes:
    """The image bytes of the sample ``key`` of a tar shard, found again from the headers (a resumed item)."""
    tar = _open(path)
    if isinstance(tar, _Corrupt):
        raise ImageError(f"{path}:{key}: {tar.why}")
    with tar:
        for g in _walk(tar):
            if isinstance(g, _Group) and g.key == key:
                for m in g.members:
                    if base_plus_ext(m.name)[1].lower() in IMAGE_EXTENSIONS:
                        try:
                            return tar.extractfile(m).read()
                        except (tarfile.TarError, OSError) as e:
                            raise ImageError(f"{path}:{key}: member {m.name} cannot be read ({e})") from None
    raise ImageError(f"{path}:{key}: no longer in the shard (it changed since the item was listed)")
