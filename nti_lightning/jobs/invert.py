"""``nti invert``: one worker's share of the images through the slot engine, on the run layer (``run/``).

Written once, top to bottom (``run_rank``):

1. **Check** the inputs and the output folder — before anything is loaded or written.
2. **Claim** the folder (every rank) and compare its settings (rank 0) — still before the model loads.
3. **Build** the model, Fabric's runtime and the engine; rank 0 commits the identity, the other ranks wait for it.
4. **Items**: this worker's static share, minus what the record index says is done.
5. **Resume** from this worker's checkpoint; a fresh start writes its first checkpoint at once, so that a kill
   at any moment resumes onto the same stream.
6. **Loop**: images stream into the engine as slots free up; finished ones are written in groups and recorded;
   the whole state is checkpointed every ``output.checkpoint_every_s`` and on a stop signal.
7. **Summary**.

Resilience: a bad image, id or caption is recorded as failed and the run goes on. A checkpoint holds every
in-flight image; on resume, images that finished after it (their index entries are newer) run again without
being written again ("ghosts"), so the engine sees exactly the stream it saw and the resumed run is
bit-identical to an uninterrupted one. Ranks never exchange gradients (every rank is its own process).
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from nti_lightning.config import RunConfig, config_to_yaml, resolve_batch_size
from nti_lightning.data.ids import UnsafeIdError, check_id
from nti_lightning.data.items import Item, caption_coverage, iter_items, read_captions
from nti_lightning.data.shards import is_shard_pattern
from nti_lightning.engine.batch_probe import probe_batch_size
from nti_lightning.engine.runtime import Runtime
from nti_lightning.engine.slots import Admission, Failed, SlotEngine, Tick
from nti_lightning.jobs.invert_items import PRE_LOAD_UNKNOWN, check_inputs, decode, pixel_hash, prefetched, run_identity
from nti_lightning.jobs.invert_outputs import (
    Done,
    format_header,
    format_row,
    image_log_metrics,
    make_metrics_logger,
    write_group,
)
from nti_lightning.run import checkpoint as ckpt
from nti_lightning.run.folder import RunFolder, WorkerId
from nti_lightning.run.launch import Placement, make_fabric
from nti_lightning.run.progress import add_log_file, close_bar, close_logger, progress_bar, worker_logger
from nti_lightning.run.records import FAILED, OK, RunIndex, short_hash, write_legacy_index
from nti_lightning.run.signals import Preempted, StopFlag, requeue_slurm_job
from nti_lightning.run.summary import RunSummary
from nti_lightning.store.files import item_relpath
from nti_lightning.text import PromptError, check_prompt


def summary_path(out_dir: Path, worker: WorkerId) -> Path:
    """Where a worker leaves its final counts for the process that launched it."""
    return Path(out_dir) / "logs" / f"summary.{worker.name}.json"


class InvertWorker:
    """The state of one worker's run; ``run_rank`` is its whole story."""

    def __init__(self, cfg: RunConfig, place: Placement, stop: StopFlag, quiet: bool) -> None:
        self.cfg, self.place, self.stop, self.quiet = cfg, place, stop, quiet
        d = cfg.data
        self.worker = WorkerId(d.shard_index, d.num_shards, place.rank, place.world)
        self.out = Path(cfg.output.dir)
        self.log = worker_logger(self.worker.name, None, quiet)
        self.folder = RunFolder(self.out, self.worker)
        self.summary = RunSummary(self.out, rank=place.rank, method=cfg.inversion.method)
        self.inflight: dict[str, tuple[Item, torch.Tensor, str]] = {}  # id → item, pixels, pixel hash
        self.to_write: list[Done] = []
        self.resumed: set[str] = set()  # restored in flight from the checkpoint: not in the stream again
        self.ghost_after = float("inf")  # records newer than the checkpoint resumed from are re-run, not re-written
        self.bar = self.metrics_logger = self.records = self.fabric = None
        self.logged = 0
        self.t_start = time.perf_counter()

    def note(self, line: str) -> None:
        self.log.info(line)

    def warn(self, line: str) -> None:
        self.log.warning(f"warning: {line}")

    # -- 1–2. check and claim ------------------------------------------------------------------------------

    def check_and_claim(self, overwrite: bool) -> None:
        self.images, self.captions_path = check_inputs(self.cfg)
        self.folder.claim(self.place.session, self.place.launcher_pid, self.note)
        if self.worker.rank == 0:
            self.folder.check_settings(run_identity(self.cfg), overwrite, unknown=PRE_LOAD_UNKNOWN)

    # -- 3. model, engine, identity ------------------------------------------------------------------------

    def build(self, load_model) -> None:
        cfg = self.cfg
        self.fabric = make_fabric(cfg, self.place, self.folder.tmp)
        self.model = load_model(
            cfg.model.spec, device=self.fabric.device, dtype=cfg.model.dtype, config_dir=cfg.model.config_dir
        )
        if cfg.model.compile != "none":  # after the fingerprint was taken; attribute access passes through
            self.model.unet = torch.compile(self.model.unet, mode=cfg.model.compile)
        self.runtime = Runtime(self.fabric)
        self.size = cfg.inversion.image_size or self.model.native_image_size
        rows = cfg.inversion.batch_size
        if rows == "auto":
            on_gpu = self.model.device.type == "cuda"
            rows = (
                probe_batch_size(self.model, cfg.inversion, self.runtime, self.size)
                if on_gpu
                else (resolve_batch_size("auto", self.model.device))
            )
            self.note(f"inversion.batch_size=auto → {rows} rows per UNet call on {self.model.device}")
        self.cfg = cfg = replace(cfg, inversion=replace(cfg.inversion, batch_size=int(rows)))
        self.engine = SlotEngine(
            self.model,
            cfg.inversion,
            int(rows),
            self.runtime,
            slots=cfg.inversion.slots,
            pad=cfg.model.compile != "none",
            image_size=self.size,
        )
        self.identity = run_identity(cfg, self.model)

    def start(self) -> None:
        """Rank 0 commits the identity and lets the other ranks start; they wait for it and check it."""
        session = self.place.session
        if self.worker.rank == 0:
            self.folder.commit(self.identity, config_to_yaml(self.cfg))
            if self.worker.world > 1:
                self.folder.publish_ready(session)
        else:
            self.folder.wait_ready(session, self.cfg.trainer.ddp_timeout_s)
            self.folder.check_settings(self.identity, overwrite=False)
        if self.worker.world > 1:
            self.folder.start_barrier(session, self.cfg.trainer.ddp_timeout_s)
        add_log_file(self.log, self.folder.log_path)
        self.records = self.folder.records(self.note)
        if self.worker.rank == 0:
            T = self.cfg.inversion.num_ddim_steps
            self.metrics_logger = make_metrics_logger(
                self.cfg.output.logger, self.out / "logs", self.worker.shard, T, self.note
            )

    def checkpoint_identity(self) -> dict:
        return {
            "run": self.identity,
            "rows": self.engine.rows,
            "slots": self.engine.num_slots,
            "batch_invariant": self.cfg.inversion.batch_invariant,
            "compile": self.cfg.model.compile,  # compiled kernels round differently: resume exactly or start over
        }

    # -- 4. items ------------------------------------------------------------------------------------------

    def load_index(self, retry_failed: bool) -> None:
        self.retry_failed = retry_failed
        index_dir = self.out / ".nti" / "index"
        if not any(index_dir.glob("*.idx")) and any(self.out.glob("manifest*.jsonl")):
            write_legacy_index(self.out, sorted(self.out.glob("manifest*.jsonl")))  # a folder from before the index
        self.index = RunIndex.load(self.out)
        self._shard_files: dict[int, bool] = {}

    def items(self):
        """The input stream in a stable order (every rank sees the same), each id checked for safety."""
        d = self.cfg.data
        for k, item in enumerate(iter_items(self.images, self.captions, d.default_prompt, d.caption_column,
                                            d.image_column)):  # fmt: skip
            if item.error is None:
                try:
                    check_id(item.id, item.label)
                except UnsafeIdError as e:
                    item = replace(item, error=str(e))
            yield k, item

    def output_exists(self, item_id: str, entry) -> bool:
        """An "ok" record's inversion is still there (deleted by hand, a lost disk: the image is redone)."""
        rel = item_relpath(item_id, self.cfg.output.subdirs)
        legacy = (item_id, f"{hashlib.sha1(item_id.encode()).hexdigest()[:2]}/{item_id}")  # folders of older runs
        return any((self.out / r / "inversion.safetensors").is_file() for r in (rel, *legacy))

    def already_done(self, item: Item) -> bool:
        entry = self.index.get(item.id)
        if entry is None:
            return False
        if entry["status"] == OK:
            return self.output_exists(item.id, entry)
        return not self.retry_failed and int(entry["prompt"]) == short_hash(item.prompt)  # a new caption: retried

    def is_ghost(self, item_id: str) -> bool:
        """Finished after the checkpoint this run resumed from: run again for an identical stream, not written."""
        entry = self.index.get(item_id)
        return entry is not None and float(entry["finished_at"]) >= self.ghost_after

    def count_items(self) -> None:
        """Pass 1 over the ids (streamed, never held): total, this worker's share, what is already done."""
        self.captions, warnings = read_captions(self.captions_path) if self.captions_path else (None, [])
        for w in warnings:
            self.warn(w)
        total = self.n_todo = self.n_mine = uncaptioned = 0
        example = None
        for k, item in self.items():
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
        if total == 0:
            raise FileNotFoundError(f"no images found in {', '.join(self.images)}; give image files, folders or lists")
        if self.captions is not None and self.worker.rank == 0:
            default = self.cfg.data.default_prompt
            if w := caption_coverage(self.captions_path, self.captions, total, uncaptioned, example, default):
                self.warn(w)
        self.folder.write_progress(
            {"total": total, "mine": self.n_mine, "todo": self.n_todo, "started_at": time.time(), **asdict(self.worker)}
        )

    def pending(self):
        """Pass 2: this worker's items still to do, in stream order."""
        for k, item in self.items():
            if not self.worker.is_mine(k) or item.id in self.resumed:
                continue
            if self.already_done(item) and not self.is_ghost(item.id):
                continue
            yield k, item

    def admissions(self):
        """The engine's input: decoded images (ahead, in a thread); bad ones recorded as failed on the way."""
        lookahead = self.cfg.output.prefetch * self.engine.rows
        for _, item, px in prefetched(self.pending(), lambda it: decode(it, self.size), lookahead):
            try:
                if isinstance(px, Exception):
                    raise px
                check_prompt(self.model.tokenizer, item.prompt, label=item.label)
            except (ValueError, OSError, PromptError) as e:
                if not self.is_ghost(item.id):
                    self.record(item, "failed", error=str(e))
                continue
            self.inflight[item.id] = (item, px, pixel_hash(px))
            yield Admission(item.id, px, item.prompt)

    # -- 5. resume -----------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Loads this worker's checkpoint into the engine if it is one of this run's (a bad file: one line, its
        images start over); re-checks every in-flight image's pixels. Without one, the first checkpoint now."""
        io_, path = self.fabric.strategy.checkpoint_io, self.folder.checkpoint
        try:
            saved = ckpt.load_checkpoint(io_, path)
            diff = ckpt.checkpoint_mismatch(saved, self.checkpoint_identity()) if saved is not None else []
        except ckpt.CheckpointError as e:
            saved, diff = None, None
            self.warn(f"{e}; its images start over")
        if saved is not None and not diff:
            try:
                self.engine.load_state_dict(saved["engine"])
            except (ValueError, KeyError, RuntimeError) as e:
                diff = [f"engine state ({e})"]
        if diff:
            self.warn(
                f"ignoring checkpoint {path}: made with other settings ({', '.join(diff)} differ); "
                "its images start over"
            )
        if saved is None or diff:
            self.save_checkpoint()  # the stream's start: a kill before the next one resumes from here
            return
        self.restore_inflight(saved)

    def restore_inflight(self, saved: dict) -> None:
        for item_id, saved_item in saved["items"].items():
            item = Item(**saved_item["item"])
            px = decode(item, self.size)
            if isinstance(px, Exception) or pixel_hash(px) != saved_item["sha256"]:
                self.engine.discard(lambda tag, i=item_id: tag == i)
                self.warn(f"{item.label}: changed since the checkpoint; it starts over")
                continue
            self.inflight[item_id] = (item, px, saved_item["sha256"])
            self.resumed.add(item_id)
        self.ghost_after = saved["saved_at"]
        self.summary.resumed = len(self.resumed)
        self.note(f"resuming {len(self.resumed)} in-flight image(s) from {self.folder.checkpoint}")

    def save_checkpoint(self) -> None:
        self.flush()
        items = {  # a shard sample's bytes are not kept: it is read again from its shard
            i: {"item": asdict(replace(it, data=None)), "sha256": sha}
            for i, (it, _, sha) in self.inflight.items()
            if i in self.engine.tags
        }
        ckpt.save_checkpoint(
            self.fabric.strategy.checkpoint_io,
            self.folder.checkpoint,
            self.checkpoint_identity(),
            self.engine.state_dict(),
            items,
        )
        self.last_save = time.monotonic()

    # -- 6. the loop ---------------------------------------------------------------------------------------

    def record(self, item: Item, status: str, **fields) -> dict:
        rec = {"id": item.id, "source": item.path, "prompt": item.prompt, "status": status, "rank": self.worker.rank}
        if self.worker.num_shards > 1:
            rec["shard"] = self.worker.shard
        rec.update(fields, finished_at=time.time())
        seconds = float(fields.get("seconds", 0.0))
        self.records.append(rec, OK if status == "ok" else FAILED, prompt=item.prompt, seconds=seconds)
        self.summary.add(rec)
        self.note(format_row(rec) if status == "ok" else f"failed {item.id}: {rec.get('error')}")
        if self.bar is not None:
            self.bar.update(1)
            n = self.summary.n_done + self.summary.n_failed
            self.bar.set_postfix(img_per_h=f"{3600 * n / max(time.perf_counter() - self.t_start, 1e-9):.0f}")
        return rec

    def flush(self) -> None:
        """Writes the finished images waiting in ``to_write`` (before every checkpoint: a kill then loses none)."""
        if self.to_write:
            group, self.to_write = self.to_write, []
            write_group(self.model, self.cfg, self.out, group, self.runtime, self.record, self.folder.tmp)

    def on_event(self, event) -> None:
        if isinstance(event, Tick):
            self.folder.check_claims()
            if self.stop.requested:
                self.save_checkpoint()
                raise Preempted(f"signal {self.stop.signum} after UNet call {event.number}")
            if time.monotonic() - self.last_save >= self.cfg.output.checkpoint_every_s:
                self.save_checkpoint()
            return
        item, px, _ = self.inflight.pop(event.tag)
        if self.is_ghost(item.id):
            return
        if isinstance(event, Failed):
            self.record(item, "failed", error=event.error)
            return
        if self.metrics_logger is not None:
            self.metrics_logger.log_metrics(image_log_metrics(event.inversion), step=self.logged)
            self.logged += 1
        self.summary.skipped_steps += int(event.inversion.meta.get("skipped_steps", 0))
        self.to_write.append(Done(item, px, event.inversion, event.seconds))
        if len(self.to_write) >= self.engine.rows:
            self.flush()

    def loop(self) -> None:
        w, c = self.worker, self.cfg
        self.note(
            f"{w.name} of {w.world} rank(s) × {w.num_shards} shard(s): {self.n_todo} to invert, {self.summary.skipped}"
            f" already done, into {self.out} on {self.fabric.device} at {self.size}px, precision "
            f"{self.runtime.precision}, T={c.inversion.num_ddim_steps}, N={c.inversion.num_inner_steps}, "
            f"{self.engine.rows} rows × {self.engine.num_slots} slots, launched by {self.place.environment}"
        )
        self.note(format_header(c.inversion.method))
        show = w.rank == 0 and c.output.progress_bar and not self.quiet
        self.bar = progress_bar(self.log, self.n_todo, f"{w.name} inverting", show)
        for event in self.engine.run(self.admissions()):
            self.on_event(event)
        self.flush()
        self.folder.checkpoint.unlink(missing_ok=True)  # only now: everything it held is written

    def close(self) -> None:
        """Every clean-up step runs, and none hides the error that stopped the run (each failure is one line)."""
        steps = [lambda: close_bar(self.log, self.bar)]
        if self.metrics_logger is not None:
            steps.append(lambda: self.metrics_logger.finalize("preempted" if self.summary.preempted else "success"))
        if getattr(self, "captions", None) is not None:
            steps.append(self.captions.close)
        steps += [self.folder.release, lambda: close_logger(self.log)]
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 — a clean-up error must not replace the run's own
                self.log.warning(f"warning: while closing: {type(e).__name__}: {e}")


def run_rank(
    cfg: RunConfig, place: Placement, stop: StopFlag, overwrite=False, retry_failed=False, quiet=False, load_model=None
) -> RunSummary:
    """This worker's whole run (module docstring)."""
    if load_model is None:
        from nti_lightning.models import load_model
    w = InvertWorker(cfg, place, stop, quiet)
    try:
        try:
            w.check_and_claim(overwrite)  # 1–2
            w.build(load_model)  # 3
            w.start()
        except BaseException as e:
            if w.worker.rank == 0 and w.worker.world > 1 and w.folder.claims:
                w.folder.publish_ready(place.session, error=f"{type(e).__name__}: {e}")
            raise
        w.load_index(retry_failed)  # 4
        w.count_items()
        w.last_save = time.monotonic()
        w.resume()  # 5
        try:
            w.loop()  # 6
        except Preempted as e:
            interrupted = stop.signum == signal.SIGINT
            w.summary.preempted, w.summary.interrupted = not interrupted, interrupted
            how = "interrupted" if interrupted else "preempted"
            w.note(
                f"{w.worker.name}: {how} ({e}); state saved to {w.folder.checkpoint}; rerun the same command to resume"
            )
            if not interrupted and w.worker.rank == 0 and cfg.output.requeue and os.environ.get("SLURM_JOB_ID"):
                requeue_slurm_job(w.note)
        s = w.summary  # 7
        s.save(summary_path(w.out, w.worker))  # for the process that launched this one: one combined report
        w.note(
            f"{w.worker.name}: {s.n_done} inverted, {s.n_failed} failed, {s.skipped} already done, {s.resumed} "
            f"resumed, {s.skipped_steps} loss-scale-skipped step(s); manifest {w.out / w.worker.manifest_name}"
        )
        return s
    finally:
        w.close()


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Output, inputs, captions and a local model path made absolute: ``config.yaml`` is then usable from any
    folder, and every rank sees the same paths whatever its working directory."""

    def absolute(p: str | None) -> str | None:
        return None if p is None or is_shard_pattern(p) else str(Path(p).expanduser().resolve())

    images = [absolute(p) or p for p in cfg.data.images] if cfg.data.images else cfg.data.images
    data = replace(cfg.data, images=images, captions=absolute(cfg.data.captions))
    spec = cfg.model.spec
    if spec not in ("tiny", "tiny-sd2-v", "tiny-sdxl") and Path(spec).expanduser().exists():
        spec = absolute(spec)
    return replace(
        cfg, output=replace(cfg.output, dir=absolute(cfg.output.dir)), data=data, model=replace(cfg.model, spec=spec)
    )


def run_inversion(cfg: RunConfig, *, overwrite=False, retry_failed=False, quiet=False, argv=None) -> RunSummary:
    """Inverts every image of ``cfg.data`` into ``cfg.output.dir`` (``nti invert``); returns this process's
    summary — for the process that started the other ranks of its node, the whole run's. ``summary.preempted``:
    a signal stopped the run with its state saved. ``argv``: the command line the other ranks run (``trainer.devices``
    > 1 without srun/torchrun)."""
    from nti_lightning.engine.runtime import resolve_precision
    from nti_lightning.run.launch import launch

    cfg = absolute_paths(cfg)
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    if precision != cfg.trainer.precision:  # "auto": record the mode that actually runs
        cfg = replace(cfg, trainer=replace(cfg.trainer, precision=precision))
    d = cfg.data
    paths = lambda r: summary_path(Path(cfg.output.dir), WorkerId(d.shard_index, d.num_shards, r, 0))  # noqa: E731
    return launch(run_rank, cfg, argv, paths, overwrite=overwrite, retry_failed=retry_failed, quiet=quiet)
