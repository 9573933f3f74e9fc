"""``open_run(OUTPUT)``: every inversion of a run, whatever its layout, as a lazy mapping id → ``Inversion``.

Where a record is comes from the run's index (``store.records``: 64 bytes per image, the latest entry of an id
wins): an entry with ``out_shard >= 0`` is in the ``shards`` layout, in ``shards/<worker>-<n>.tar`` (or the
``.tar.part`` being written) at byte ``out_offset`` (``tar_records``); one with ``out_shard = -1`` is a
``folders``-layout file, at ``images/[ab/]<id component>/inversion.safetensors`` — or, in folders made before
``images/``, ``<id>/`` and ``<ab>/<id>/``, found through the manifests' ``paths.inversion``. A folder from
before the index is read from its manifests (in memory; nothing is written).

Nothing is read until asked: ``len`` and ``in`` use the index alone; ``run[id]`` reads one record (one seek
for a shard); iteration goes shard by shard in file order, each shard opened once (folders-layout records
follow, in manifest order); ``as_dataset()`` is a ``torch.utils.data.Dataset`` over the same order, safe to use
with DataLoader workers (each opens its own files).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from nti_lightning.store.files import item_relpath
from nti_lightning.store.inversion import Inversion, inversion_from_bytes, validate_record
from nti_lightning.store.records import INDEX_DIR, OK, RunIndex, legacy_entries, read_index_file
from nti_lightning.store.tar_records import INVERSION_EXT, META_EXT, index_file, locate_shard, read_member, read_span

LOCATION = np.dtype([("worker", "<i4"), ("shard", "<i4"), ("offset", "<i8")])


class RunReader(Mapping):
    """The records of one run folder (module docstring); ``open_run`` makes it."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.root = Path(out_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not an output folder (no such folder)")
        files = sorted((self.root / INDEX_DIR).glob("*.idx"))
        by_worker = {p.stem: read_index_file(p) for p in files}
        if not by_worker:
            manifests = sorted(self.root.glob("manifest*.jsonl"))
            if not manifests:
                raise FileNotFoundError(f"{self.root} is not the output folder of an `nti invert` run (no index or "
                                        "manifest)")  # fmt: skip
            by_worker = {"legacy": legacy_entries(manifests)}
        self.index = RunIndex.from_workers(by_worker)
        e = self.index.entries
        ok = e["status"] == OK
        in_shards = ok & (e["out_shard"] >= 0)
        loc = np.zeros(int(in_shards.sum()), LOCATION)
        loc["worker"], loc["shard"], loc["offset"] = self.index.origin[in_shards], e["out_shard"][in_shards], \
            e["out_offset"][in_shards]  # fmt: skip
        self.locations = np.sort(loc, order=["worker", "shard", "offset"])  # shard order
        self.n_folder = int((ok & (e["out_shard"] < 0)).sum())
        self._folder: list[tuple[str, str]] | None = None  # (id, relative path), read from manifests on demand
        self._open: dict[Path, object] = {}
        self._pid = os.getpid()  # the process the open files belong to

    # -- the mapping ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.locations) + self.n_folder

    def _entry(self, item_id: object):
        i = self.index.position(item_id) if isinstance(item_id, str) else None
        if i is None or self.index.entries[i]["status"] != OK:
            return None, None
        return i, self.index.entries[i]

    def __contains__(self, item_id: object) -> bool:
        return self._entry(item_id)[0] is not None

    def __getitem__(self, item_id: str) -> Inversion:
        i, entry = self._entry(item_id)
        if i is None:
            raise KeyError(item_id)
        if entry["out_shard"] >= 0:
            return self._read_shard(int(self.index.origin[i]), int(entry["out_shard"]), int(entry["out_offset"]))
        return self._read_folder(item_id)

    def __iter__(self) -> Iterator[str]:
        for item_id, _ in self._walk(read=False):
            yield item_id

    def items(self) -> Iterator[tuple[str, Inversion]]:  # type: ignore[override]
        """(id, inversion) in shard order, each shard opened once."""
        yield from self._walk(read=True)

    def values(self) -> Iterator[Inversion]:  # type: ignore[override]
        for _, inv in self._walk(read=True):
            yield inv

    def locate(self, item_id: str) -> str:
        """Where ``item_id``'s record is, for messages: ``shards/<file>@<offset>`` or the folder file's path."""
        i, entry = self._entry(item_id)
        if i is None:
            raise KeyError(item_id)
        if entry["out_shard"] >= 0:
            path = self._shard_path(int(self.index.origin[i]), int(entry["out_shard"]))
            return f"{path}@{int(entry['out_offset'])}"
        return str(self._folder_path(item_id))

    def load(self, item_id: str, model=None) -> Inversion:
        """``run[item_id]`` checked as ``load_inversion`` checks a file (``validate_record``; with ``model``, also
        that it was made with it), errors naming where the record is."""
        inv = self[item_id]
        validate_record(inv, model, label=self.locate(item_id))
        return inv

    def as_dataset(self, transform: Callable[[str, Inversion], object] | None = None):
        """A ``torch.utils.data.Dataset`` of the records in shard order: item k is ``transform(id, inversion)``,
        by default a dict of the record's tensors with its ``id`` and ``prompt`` (DataLoader's default collate
        stacks them)."""
        from nti_lightning.store.reader_dataset import InversionDataset

        return InversionDataset(self, transform)

    # -- shards --------------------------------------------------------------------------------------------

    def _shard_path(self, worker: int, shard: int) -> Path:
        name = self.index.workers[worker]
        path = locate_shard(self.root, name, shard)
        if path is None:
            raise FileNotFoundError(f"output shard {name}-{shard:06d}.tar of {self.root} is missing")
        return path

    def _file(self, path: Path):
        if self._pid != os.getpid():  # a forked DataLoader worker: the parent's files share their offsets with it
            self._open, self._pid = {}, os.getpid()
        f = self._open.get(path)
        if f is None:
            if len(self._open) >= 8:  # a few files open at a time
                self.close()
            f = self._open[path] = open(path, "rb")
        return f

    def _read_at(self, path: Path, offset: int) -> tuple[Inversion, object, object]:
        f = self._file(path)
        try:
            span = read_span(f, offset)
        except ValueError as e:
            raise ValueError(f"{path}: {e}; the shard does not match the run's index (rewritten or damaged)") from e
        return inversion_from_bytes(read_member(f, span, INVERSION_EXT), label=f"{path}@{offset}"), f, span

    def _read_shard(self, worker: int, shard: int, offset: int) -> Inversion:
        return self._read_at(self._shard_path(worker, shard), offset)[0]

    def read_location(self, k: int) -> tuple[str, Inversion]:
        """The k-th shard record in shard order: (id, inversion)."""
        w, s, off = (int(x) for x in self.locations[k])
        inv, f, span = self._read_at(self._shard_path(w, s), off)
        return _id_of(inv, f, span), inv

    def _shard_ids(self, worker: int, shard: int, offsets: np.ndarray) -> list[str] | None:
        """The ids at ``offsets`` from the finished shard's index file (None: none, or it does not match)."""
        import json

        path = self._shard_path(worker, shard)
        try:
            index = json.loads((path.parent / index_file(path.name)).read_text(encoding="utf-8"))
            at = dict(zip(index["offsets"], index["ids"]))
            return [at[int(o)] for o in offsets]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _walk(self, read: bool) -> Iterator[tuple[str, Inversion | None]]:
        loc = self.locations
        if len(loc):
            cut = np.flatnonzero((loc["worker"][1:] != loc["worker"][:-1]) | (loc["shard"][1:] != loc["shard"][:-1]))
            for group in np.split(loc, cut + 1):
                w, s = int(group["worker"][0]), int(group["shard"][0])
                ids = None if read else self._shard_ids(w, s, group["offset"])
                path = self._shard_path(w, s)
                for k, off in enumerate(group["offset"]):
                    if ids is not None:
                        yield ids[k], None
                        continue
                    f = self._file(path)
                    span = read_span(f, int(off))
                    if read:
                        inv = inversion_from_bytes(read_member(f, span, INVERSION_EXT), label=f"{path}@{int(off)}")
                        yield _id_of(inv, f, span), inv
                    else:
                        yield _json_id(f, span), None
        for item_id, rel in self.folder_records():
            yield item_id, (self._load_file(self.root / rel) if read else None)

    # -- folders -------------------------------------------------------------------------------------------

    def folder_records(self) -> list[tuple[str, str]]:
        """(id, path relative to the run) of every folders-layout record, in manifest order (read once)."""
        if self._folder is None:
            self._folder = []
            if self.n_folder:
                from nti_lightning.store.manifest import iter_manifest_records

                seen: dict[str, str] = {}
                for rec in iter_manifest_records(self.root):
                    item_id, paths = str(rec["id"]), rec.get("paths") or {}
                    if rec.get("status") != "ok" or "inversion" not in paths:
                        continue
                    i, entry = self._entry(item_id)
                    if i is not None and entry["out_shard"] < 0:
                        seen.pop(item_id, None)  # a later line of an id wins, and takes its place in the order
                        seen[item_id] = paths["inversion"]
                self._folder = list(seen.items())
        return self._folder

    def _folder_path(self, item_id: str) -> Path:
        legacy = hashlib.sha1(item_id.encode()).hexdigest()[:2]
        for rel in (item_relpath(item_id), item_relpath(item_id, True), item_id, f"{legacy}/{item_id}"):
            path = self.root / rel / "inversion.safetensors"
            if path.is_file():
                return path
        found = dict(self.folder_records()).get(item_id)
        if found is None:
            raise FileNotFoundError(f"the inversion of {item_id!r} is not in {self.root} (deleted since it was made?)")
        return self.root / found

    def _read_folder(self, item_id: str) -> Inversion:
        return self._load_file(self._folder_path(item_id))

    @staticmethod
    def _load_file(path: Path) -> Inversion:
        return inversion_from_bytes(path.read_bytes(), label=str(path))

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open = {}

    def __getstate__(self) -> dict:  # DataLoader workers: no open files travel
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 — interpreter shutdown
            pass


def _json_id(f, span) -> str:
    import json

    return str(json.loads(read_member(f, span, META_EXT))["id"])


def _id_of(inv: Inversion, f, span) -> str:
    image = inv.meta.get("image")
    if isinstance(image, dict) and isinstance(image.get("id"), str):
        return image["id"]
    return _json_id(f, span)


def open_run(out_dir: str | os.PathLike) -> RunReader:
    """Every inversion of the run in ``out_dir`` (``nti invert``'s output, any layout, any age) as a lazy
    mapping id → ``Inversion`` (module docstring)."""
    return RunReader(out_dir)


__all__ = ["open_run", "RunReader"]
