"""A worker's share of a run's inputs: plain inputs split per item, dataset shards split per shard.

* **Plain inputs** (image files, folders, list files) are one stream (``data.inputs.iter_items``), numbered
  k = 0, 1, …; item k is the worker's when ``WorkerId.is_mine(k)``. Every worker walks the whole stream (names
  only; no image is opened), so each knows the plain total exactly.
* **Input shards** (tar, Parquet row groups) are listed once (``data.shards.list_shards``, the same order on
  every worker) and shard j is the worker's when ``is_mine(j)``: a worker opens only its own shards, to count
  (``shard_size``: tar headers, a Parquet footer) and to read.

Each input shard is known in the run by its **source** hash, ``short_hash("<name>[#<row group>]:<bytes>")``,
stored in the index entry of every record made from it (``store.records``): done counts per input shard come
from the index alone. The file's byte size is part of it, so a shard replaced by another of the same name
counts as new. Each worker's progress file lists its shards (name, source, size); a rerun takes the sizes from
there (same source: same file) instead of counting again.

On a resume a shard is **not opened at all** when the index says every sample of it is done: all "ok" with
their output shard files present, or "ok"/failed with failures not being retried and the prompt settings
(captions file, default prompt, caption column) unchanged since — a failed sample's prompt is then what it was
(``prompt_settings``). A partly done shard is read with ``iter_shard(skip=...)``: done samples are seeked past,
never read or decoded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from nti_lightning.data import shards as shard_io
from nti_lightning.data.ids import UnsafeIdError, check_id
from nti_lightning.data.inputs import iter_items
from nti_lightning.data.items import Item
from nti_lightning.data.samples import ShardRef
from nti_lightning.run.folder import WorkerId
from nti_lightning.store.records import short_hash


@dataclass
class InputShard:
    """One input shard of the run: its position ``k`` in the run's list, display name, source hash, size."""

    ref: ShardRef
    k: int
    name: str  # "<name>" or "<name>#<row group>"
    source: int = 0  # short_hash("<name>:<bytes>"); 0 until ``identify``
    size: int | None = None  # items ``iter_shard`` yields; None until counted

    def identify(self) -> None:
        """The source hash, from the name and the file's byte size (one ``stat``)."""
        try:
            nbytes = os.path.getsize(self.ref.path)
        except OSError:
            nbytes = -1
        self.source = short_hash(f"{self.name}:{nbytes}")


def shard_label(ref: ShardRef) -> str:
    return ref.name if ref.row_group is None else f"{ref.name}#{ref.row_group}"


def prompt_settings(captions: str | None, default_prompt: str | None, caption_column: str | None) -> str:
    """What sets a sample's prompt besides the sample itself: the captions file (path, size, time), the default
    prompt and the caption column, as one hash (hex)."""
    stat = None
    if captions:
        try:
            st = os.stat(captions)
            stat = [st.st_size, st.st_mtime_ns]
        except OSError:
            pass
    return f"{short_hash(json.dumps([captions, stat, default_prompt, caption_column])):016x}"


def check_item(item: Item) -> Item:
    """The item, failed with the reason when its id is unsafe (``data.ids.check_id``)."""
    if item.error is None:
        try:
            check_id(item.id, item.label)
        except UnsafeIdError as e:
            return replace(item, error=str(e))
    return item


def read_progress(out_dir: Path) -> list[dict]:
    """Every worker's progress file of a run (unreadable ones left out)."""
    out = []
    for p in sorted((Path(out_dir) / "progress").glob("*.json")):
        try:
            out.append({"_worker": p.stem, **json.loads(p.read_text(encoding="utf-8"))})
        except (OSError, ValueError):
            continue
    return out


class InputShare:
    """This worker's share of the inputs (module docstring)."""

    def __init__(self, inputs: list[str], worker: WorkerId, data_cfg, captions_path: str | None) -> None:
        self.worker, self.d = worker, data_cfg
        self.plain: list[str] = []
        self.shards: list[InputShard] = []
        seen: dict[str, set] = {}  # shard names of earlier inputs: ids never collide across inputs
        for inp in inputs:
            if not shard_io.is_shard_input(inp):
                self.plain.append(inp)
                continue
            refs = shard_io.list_shards([inp], data_cfg.image_column)
            shard_io.check_names(refs, seen)
            self.shards += [InputShard(r, len(self.shards) + i, shard_label(r)) for i, r in enumerate(refs)]
        self.mine = [s for s in self.shards if worker.is_mine(s.k)]
        for s in self.mine:
            s.identify()
        self.prompts = prompt_settings(captions_path, data_cfg.default_prompt, data_cfg.caption_column)

    def index_sources(self):
        """The source hashes whose index entries this worker needs (None: all of them — plain inputs' entries
        carry no source)."""
        if self.plain:
            return None
        import numpy as np

        return np.array([s.source for s in self.mine], dtype=np.uint64)

    def plain_items(self, captions) -> Iterator[tuple[int, Item]]:
        """The plain inputs' stream, every worker the same (split by ``is_mine(k)``), ids checked."""
        if not self.plain:
            return
        d = self.d
        for k, item in enumerate(iter_items(self.plain, captions, d.default_prompt, d.caption_column, d.image_column)):
            yield k, check_item(item)

    # -- counting ------------------------------------------------------------------------------------------

    def count_mine(self, previous: list[dict]) -> int:
        """Sizes of this worker's shards (from earlier progress files where the source matches, else counted
        from the shard's headers or footer); returns their sum."""
        known = {}
        for prog in previous:
            for name, source, size in prog.get("shards", []):
                known[(name, source)] = size
        for s in self.mine:
            s.size = known.get((s.name, f"{s.source:016x}"))
            if s.size is None:
                s.size = shard_io.shard_size(s.ref)
        return sum(s.size for s in self.mine)

    def table(self) -> list[list]:
        """[name, source (hex), size] of this worker's shards, for its progress file."""
        return [[s.name, f"{s.source:016x}", s.size] for s in self.mine]

    # -- the stream ----------------------------------------------------------------------------------------

    def untouched(self, done: dict[int, tuple[int, int]], retry_failed: bool, previous: list[dict]) -> set[int]:
        """Sources of this worker's shards that need not be opened: ``done[source] = (ok, failed)`` (ok: "ok"
        with its output present; both without the images re-run as ghosts) covers the whole shard."""
        same_prompts = all(p.get("prompts", self.prompts) == self.prompts for p in previous)
        out = set()
        for s in self.mine:
            ok, failed = done.get(s.source, (0, 0))
            if s.size is not None and (ok == s.size or (ok + failed == s.size and not retry_failed and same_prompts)):
                out.add(s.source)
        return out

    def shard_items(
        self, captions, skip: Callable[[str], bool], untouched: set[int], on_skipped: Callable[[InputShard], None]
    ) -> Iterator[tuple[int, Item]]:
        """(source, item) of this worker's shards in order; an untouched shard is not opened (``on_skipped``)."""
        d = self.d
        for s in self.mine:
            if s.source in untouched:
                on_skipped(s)
                continue
            for item in shard_io.iter_shard(s.ref, captions, d.default_prompt, d.caption_column, skip, d.image_column):
                yield s.source, check_item(item)
