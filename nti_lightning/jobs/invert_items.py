"""What ``nti invert`` checks and reads before and around its loop: inputs, the run's identity, the item stream.

* ``check_inputs`` — every input path exists, the captions file too, the output is not a file: before anything
  is loaded or written.
* ``absolute_paths`` — the configuration's paths made absolute (every rank sees the same files).
* ``run_identity`` — what must not change between runs writing into one folder (``run.json``); without a model
  it is the part a rerun can compare before spending the model load (``PRE_LOAD_UNKNOWN`` is what only the
  loaded model tells).
* ``decode`` / ``prefetched`` / ``pixel_hash`` — an item's pixels, decoded ahead in a thread, and the hash a
  resumed run checks them against.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from nti_lightning.config import RunConfig
from nti_lightning.data.image import ImageError, prepare_image
from nti_lightning.data.items import SAMPLES_DIR, Item, caption_coverage, read_captions
from nti_lightning.data.shards import is_shard_pattern, read_sample
from nti_lightning.engine.slots import Admission
from nti_lightning.jobs.invert_outputs import ShardOutputs
from nti_lightning.jobs.paths import absolute, absolute_model
from nti_lightning.run.layout import choose_layout
from nti_lightning.run.share import InputShare, read_progress
from nti_lightning.store.files import item_relpath
from nti_lightning.store.records import FAILED, OK, RunIndex, done_by_source, short_hash, write_legacy_index
from nti_lightning.store.tar_records import locate_shard
from nti_lightning.text import PromptError, check_prompt

# settings that change how fast a run goes, not what it computes (batch_invariant: bits, not results)
NOT_IDENTITY = ("batch_size", "slots", "batch_invariant")
# fields added after folders were made: left out of the identity while at their defaults, so those folders still
# match (a run with another method, or proximal settings of proxnpi, is a different run)
LATER_FIELDS = ("method", "prox_operator", "prox_quantile", "prox_recon_t", "prox_recon_lr", "prox_dilate")
PRE_LOAD_UNKNOWN = ("model_fingerprint", "image_size", "inversion.image_size")
"""Identity keys only the loaded model can tell: compared after the load."""


def resolve_inputs(cfg: RunConfig) -> tuple[list[str], str | None]:
    """The run's inputs and captions file; none given: the bundled sample photos and their captions."""
    if cfg.data.images:
        return list(cfg.data.images), cfg.data.captions
    return [str(SAMPLES_DIR)], cfg.data.captions or str(SAMPLES_DIR / "captions.jsonl")


def check_inputs(cfg: RunConfig) -> tuple[list[str], str | None]:
    """``resolve_inputs`` checked: a missing input or captions file, or an output that is a file, is an error
    naming it — raised before the folder is touched."""
    images, captions = resolve_inputs(cfg)
    for path in images:
        if not os.path.exists(path) and not is_shard_pattern(path):  # a pattern's shards: list_shards checks them
            raise FileNotFoundError(f"input {path} does not exist; fix --images (or data.images)")
    if captions is not None and not Path(captions).is_file():
        raise FileNotFoundError(f"captions file {captions} does not exist; fix --captions (or data.captions)")
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output folder {out} is a file; give a folder (--output / output.dir)")
    return images, captions


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Output, inputs, captions and a local model path made absolute: ``config.yaml`` is then usable from any
    folder, and every rank sees the same paths whatever its working directory."""

    images = (
        [p if is_shard_pattern(p) else absolute(p) for p in cfg.data.images] if cfg.data.images else cfg.data.images
    )
    data = replace(cfg.data, images=images, captions=absolute(cfg.data.captions))
    return replace(
        cfg, output=replace(cfg.output, dir=absolute(cfg.output.dir)), data=data, model=absolute_model(cfg.model)
    )


def run_identity(cfg: RunConfig, model=None) -> dict:
    """What must not change between runs writing into one folder; ``model`` None: the part known before the
    load (the source from the spec, no fingerprint, the image size as configured)."""
    from nti_lightning.models.loading import model_source, resolve_config_dir

    defaults = asdict(type(cfg.inversion)())
    inversion = {
        k: v
        for k, v in asdict(cfg.inversion).items()
        if k not in NOT_IDENTITY and not (k in LATER_FIELDS and v == defaults[k])
    }
    size = (cfg.inversion.image_size or model.native_image_size) if model is not None else cfg.inversion.image_size
    inversion["image_size"] = size  # null and the size it resolves to are one
    if model is not None:
        source, config_dir = model.source, model.config_dir
    else:
        source = model_source(cfg.model.spec)
        single = Path(str(cfg.model.spec)).suffix in (".safetensors", ".ckpt")
        config_dir = resolve_config_dir(cfg.model.config_dir)[1] if single else None
    return {
        "model_fingerprint": model.fingerprint if model is not None else None,
        "model_source": source,
        # a single-file checkpoint's config folder sets its scheduler and prediction type; only present then
        **({"model_config_dir": config_dir} if config_dir else {}),
        "inversion": inversion,
        "image_size": size,
        "precision": cfg.trainer.precision,
    }


def pixel_hash(pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.detach().cpu().contiguous().numpy()).hexdigest()  # the buffer, not a copy


def decode(item: Item, size: int) -> torch.Tensor | Exception:
    """The item's pixels (3, size, size) in [-1, 1], or the error that names the file and the fix."""
    try:
        if item.error:
            raise ValueError(item.error)
        if item.key is not None:  # a shard sample: its bytes, read with it or (restored from a checkpoint) again
            data = item.data if item.data is not None else read_sample(item)
            return prepare_image(data, size, name=item.label)
        if item.where is not None and not os.path.isfile(item.path):
            raise ImageError(
                f"{item.where}: image {item.path} not found; fix the path (relative paths are relative to the "
                "list file's folder) or remove the row"
            )
        return prepare_image(item.path, size, name=item.label)
    except (ImageError, ValueError, OSError) as e:
        return e


def decode_hashed(item: Item, size: int) -> tuple[torch.Tensor, str] | Exception:
    """``decode`` and the pixels' hash together: both in the decoding thread, off the engine's."""
    px = decode(item, size)
    return px if isinstance(px, Exception) else (px, pixel_hash(px))


def prefetched(
    items: Iterator[tuple[int, Item]], load: Callable[[Item], object], lookahead: int
) -> Iterator[tuple[int, Item, object]]:
    """``(k, item, load(item))`` in order, with up to ``lookahead`` items loaded ahead in a background thread."""
    if lookahead == 0:
        yield from ((k, it, load(it)) for k, it in items)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nti-decode") as pool:
        queue: deque = deque()
        for k, it in items:
            queue.append((k, it, pool.submit(load, it)))
            if len(queue) > lookahead:
                k0, head, fut = queue.popleft()
                yield k0, head, fut.result()
        while queue:
            k0, head, fut = queue.popleft()
            yield k0, head, fut.result()


class WorkerItems:
    """The item half of ``jobs.invert.InvertWorker`` (step 4): what is done, this worker's share of the inputs
    (``run.share``: plain inputs split per item, input shards per shard), the layout it writes, and the stream
    of images the engine is fed. Uses the worker's ``cfg``, ``worker``, ``out``, ``folder``, ``summary``,
    ``resumed``, ``ghost_after``, ``sources`` and ``inflight``.
    """

    def load_index(self, retry_failed: bool) -> None:
        """This worker's share of the inputs (``run.share``; no shard is opened), then the record index: with
        input shards only, just the entries of its own shards (and its own file whole)."""
        self.retry_failed = retry_failed
        self.share = InputShare(self.images, self.worker, self.cfg.data, self.captions_path)
        index_dir = self.out / ".nti" / "index"
        if not any(index_dir.glob("*.idx")) and any(self.out.glob("manifest*.jsonl")):
            write_legacy_index(self.out, sorted(self.out.glob("manifest*.jsonl")))  # a folder from before the index
        self.index = RunIndex.load(self.out, sources=self.share.index_sources(), whole=self.worker.name)
        self._shard_files: dict[tuple[int, int], bool] = {}

    def shard_exists(self, origin: int, shard: int) -> bool:
        """Whether output shard ``shard`` of the worker ``index.workers[origin]`` is there (asked once each)."""
        if (origin, shard) not in self._shard_files:
            found = locate_shard(self.out, self.index.workers[origin], shard)
            self._shard_files[(origin, shard)] = found is not None
        return self._shard_files[(origin, shard)]

    def output_exists(self, item_id: str, i: int) -> bool:
        """An "ok" record's output is still there (deleted by hand, a lost disk: the image is redone): its
        output shard file, or its folders-layout file."""
        entry = self.index.entries[i]
        if entry["out_shard"] >= 0:
            return self.shard_exists(int(self.index.origin[i]), int(entry["out_shard"]))
        rel = item_relpath(item_id, self.cfg.output.subdirs)
        legacy = (item_id, f"{hashlib.sha1(item_id.encode()).hexdigest()[:2]}/{item_id}")  # folders of older runs
        return any((self.out / r / "inversion.safetensors").is_file() for r in (rel, *legacy))

    def already_done(self, item: Item) -> bool:
        i = self.index.position(item.id)
        if i is None:
            return False
        entry = self.index.entries[i]
        if entry["status"] == OK:
            return self.output_exists(item.id, i)
        return not self.retry_failed and int(entry["prompt"]) == short_hash(item.prompt)  # a new caption: retried

    def is_ghost(self, item_id: str) -> bool:
        """Finished after the checkpoint this run resumed from: run again for an identical stream, not written."""
        entry = self.index.get(item_id)
        return entry is not None and float(entry["finished_at"]) >= self.ghost_after

    def count_items(self) -> None:
        """Pass 1: the plain inputs' ids (streamed, never held) and the sizes of this worker's input shards (no
        other worker's shard is opened): its share, what is already done, the layout it writes."""
        self.captions, warnings = read_captions(self.captions_path) if self.captions_path else (None, [])
        for w in warnings:
            self.warn(w)
        self.previous = read_progress(self.out)  # before this worker's own file is rewritten
        total = self.n_todo = self.n_mine = uncaptioned = 0
        example = None
        for k, item in self.share.plain_items(self.captions):
            total += 1
            if item.error is None and not item.captioned and item.prompt == self.cfg.data.default_prompt:
                uncaptioned += 1
                example = example or item.id
            if not self.worker.is_mine(k):
                continue
            self.n_mine += 1
            if self.already_done(item):
                self.summary.skipped += 1
                self.summary.skipped_failed += int(self.index.get(item.id)["status"] == FAILED)
            else:
                self.n_todo += 1
        if total == 0 and not self.share.shards:
            raise FileNotFoundError(f"no images found in {', '.join(self.images)}; give image files, folders or lists")
        if self.captions is not None and self.worker.rank == 0 and total:
            default = self.cfg.data.default_prompt
            if w := caption_coverage(self.captions_path, self.captions, total, uncaptioned, example, default):
                self.warn(w)
        mine = self.share.count_mine(self.previous)
        e = self.index.entries
        done = np.isin(e["source"], [s.source for s in self.share.mine]) & (e["source"] != 0)
        done &= (e["status"] == OK) | (not self.retry_failed)
        self.shard_done_estimate = int(done.sum())  # exact counts come as the shards are walked
        self.n_mine, self.n_todo = self.n_mine + mine, self.n_todo + max(mine - self.shard_done_estimate, 0)
        shards = self.share
        estimate = total + (round(mine / len(shards.mine) * len(shards.shards)) if shards.mine else 0)
        self.layout, why, self.untouched = self.cfg.output.layout, None, None
        self.coverage: list = [0, 0, None]  # shard samples read, of them uncaptioned, the first such id
        if self.n_mine:  # a worker with nothing to write does not decide
            self.layout, why = choose_layout(self.layout, self.out, estimate, self.folder.tmp)
            self.note(f"{self.worker.name}: writing the {self.layout} layout ({why})")
        self.folder.write_progress(
            {"total": None if shards.shards else total, "mine": self.n_mine, "todo": self.n_todo,
             "input_shards": len(shards.shards), "plain_total": total, "shards": shards.table(),
             "prompts": shards.prompts, "layout": self.layout, "started_at": time.time(), **asdict(self.worker)}
        )  # fmt: skip

    def open_outputs(self) -> None:
        """The shards layout's writer: this worker's ``.part`` cut back to what its index committed."""
        if self.layout == "shards":
            own = self.index.by_worker.get(self.worker.name)
            committed = [] if own is None else own[own["out_shard"] >= 0][["out_shard", "out_offset"]].tolist()
            self.shard_out = ShardOutputs(self.cfg, self.out, self.worker.name, committed, self.folder.tmp, self.note)

    def skip_done(self, item_id: str) -> bool:
        """For ``iter_shard``: a sample to pass by unread — in flight from the checkpoint, or "ok" with its output
        there (not a ghost); a failed one is read (its prompt decides whether it is retried)."""
        if item_id in self.resumed:
            return True
        i = self.index.position(item_id)
        if i is None:
            return False
        entry = self.index.entries[i]
        ghost = float(entry["finished_at"]) >= self.ghost_after
        if entry["status"] != OK or ghost or not self.output_exists(item_id, i):
            return False
        self.summary.skipped += 1
        return True

    def untouched_sources(self) -> set[int]:
        """This worker's input shards that are wholly done: not opened (``run.share.InputShare.untouched``). Known
        once the checkpoint is loaded (the images re-run as ghosts count as not done)."""
        if not self.share.mine:
            self.done_counts = {}
            return set()
        e, origin = self.index.entries, self.index.origin
        fresh = e["finished_at"] < self.ghost_after
        ok = (e["status"] == OK) & fresh & (e["out_shard"] >= 0)  # a folders-layout output is checked per image
        codes = origin.astype(np.int64) << 32 | e["out_shard"].astype(np.int64)
        missing = [c for c in np.unique(codes[ok]).tolist() if not self.shard_exists(c >> 32, c & 0xFFFFFFFF)]
        if missing:
            ok &= ~np.isin(codes, missing)
        self.done_counts = done_by_source(e, ok, (e["status"] == FAILED) & fresh)
        return self.share.untouched(self.done_counts, self.retry_failed, self.previous)

    def warn_coverage(self) -> None:
        """A captions file that covers few of the input shards' samples this worker read: one warning at the end
        (each worker reads only its own shards; the plain inputs' coverage is told before the run)."""
        seen, uncaptioned, example = self.coverage
        if self.captions is not None and seen:
            default = self.cfg.data.default_prompt
            if w := caption_coverage(self.captions_path, self.captions, seen, uncaptioned, example, default):
                self.warn(f"{self.worker.name}'s input shards: {w}")

    def skip_untouched(self, shard) -> None:
        ok, failed = self.done_counts.get(shard.source, (0, 0))
        self.summary.skipped += ok + failed
        self.summary.skipped_failed += failed

    def pending(self):
        """Pass 2: (source, item) of this worker's items still to do, in stream order (plain inputs, then its
        input shards in order)."""
        for k, item in self.share.plain_items(self.captions):
            if not self.worker.is_mine(k) or item.id in self.resumed:
                continue
            if self.already_done(item) and not self.is_ghost(item.id):
                continue
            yield 0, item
        untouched = self.untouched if self.untouched is not None else self.untouched_sources()
        for source, item in self.share.shard_items(self.captions, self.skip_done, untouched, self.skip_untouched):
            self.coverage[0] += 1
            if item.error is None and not item.captioned and item.prompt == self.cfg.data.default_prompt:
                self.coverage[1] += 1
                self.coverage[2] = self.coverage[2] or item.id
            if self.already_done(item):  # a failure not retried, or a ghost (re-run, not written)
                self.summary.skipped += 1
                self.summary.skipped_failed += int(self.index.get(item.id)["status"] == FAILED)
                if not self.is_ghost(item.id):
                    continue
            yield source, item

    def admissions(self):
        """The engine's input: decoded images and their hashes (ahead, in a thread); bad ones recorded as failed
        on the way."""
        lookahead = self.cfg.output.prefetch * self.engine.rows
        for source, item, loaded in prefetched(self.pending(), lambda it: decode_hashed(it, self.size), lookahead):
            self.sources[item.id] = source
            try:
                if isinstance(loaded, Exception):
                    raise loaded
                check_prompt(self.model.tokenizer, item.prompt, label=item.label)
            except (ValueError, OSError, PromptError) as e:
                if not self.is_ghost(item.id):
                    self.record(item, "failed", error=str(e))
                self.sources.pop(item.id, None)
                continue
            px, sha = loaded
            self.inflight[item.id] = (item, px, sha)
            yield Admission(item.id, px, item.prompt)
