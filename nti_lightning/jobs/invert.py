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

A bad image, id or caption is recorded as failed and the run goes on. On resume, images that finished after the
checkpoint (newer index entries) run again unwritten ("ghosts"): the engine sees the stream it saw, bit for bit.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from nti_lightning.config import RunConfig, config_to_yaml, resolve_batch_size
from nti_lightning.data.items import Item
from nti_lightning.engine.batch_probe import probe_batch_size
from nti_lightning.engine.runtime import Runtime
from nti_lightning.engine.slots import Failed, SlotEngine, Tick
from nti_lightning.jobs.invert_items import (
    PRE_LOAD_UNKNOWN,
    WorkerItems,
    absolute_paths,
    check_inputs,
    decode,
    pixel_hash,
    run_identity,
)
from nti_lightning.jobs.invert_outputs import (
    Done,
    ShardOutputs,
    format_header,
    format_row,
    image_log_metrics,
    make_metrics_logger,
    measure_group,
    write_folders,
)
from nti_lightning.run import checkpoint as ckpt
from nti_lightning.run.commits import CommitStage
from nti_lightning.run.folder import RunFolder, WorkerId
from nti_lightning.run.job import summary_path
from nti_lightning.run.launch import Placement, make_fabric
from nti_lightning.run.progress import add_log_file, close_bar, close_logger, progress_bar, worker_logger
from nti_lightning.run.signals import Preempted, StopFlag, requeue_slurm_job
from nti_lightning.run.summary import RunSummary
from nti_lightning.store.records import FAILED, OK, Row


class InvertWorker(WorkerItems):
    """The state of one worker's run; ``run_rank`` is its whole story."""

    def __init__(
        self, cfg: RunConfig, place: Placement, stop: StopFlag, quiet: bool, engine_factory=None, measure=None
    ) -> None:
        self.cfg, self.place, self.stop, self.quiet = cfg, place, stop, quiet
        self.engine_factory = engine_factory or SlotEngine  # (model, cfg.inversion, rows, runtime, **options)
        self.measure = measure or measure_group  # (model, cfg, group, runtime) → [Measured]
        d = cfg.data
        self.worker = WorkerId(d.shard_index, d.num_shards, place.rank, place.world)
        self.out = Path(cfg.output.dir)
        self.log = worker_logger(self.worker.name, None, quiet)
        self.folder = RunFolder(self.out, self.worker)
        self.summary = RunSummary(self.out, rank=place.rank, method=cfg.inversion.method)
        self.inflight: dict[str, tuple[Item, torch.Tensor, str]] = {}  # id → item, pixels, pixel hash
        self.sources: dict[str, int] = {}  # id → its input shard's source hash, until it is recorded
        self.to_write: list[Done] = []
        self.commits = CommitStage()  # writes and commits finished images while the engine runs on
        self.shard_out: ShardOutputs | None = None  # the shards layout's writer
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
        self.engine = self.engine_factory(
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
            self.sources[item_id] = int(saved_item.get("source", 0))
            self.resumed.add(item_id)
        self.ghost_after = saved["saved_at"]
        self.summary.resumed = len(self.resumed)
        self.note(f"resuming {len(self.resumed)} in-flight image(s) from {self.folder.checkpoint}")

    def save_checkpoint(self) -> None:
        self.flush(wait=True)  # everything finished before the checkpoint is committed first
        items = {  # a shard sample's bytes are not kept: it is read again from its shard
            i: {"item": asdict(replace(it, data=None)), "sha256": sha, "source": self.sources.get(i, 0)}
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

    def make_record(self, item: Item, status: str, **fields) -> dict:
        rec = {"id": item.id, "source": item.path, "prompt": item.prompt, "status": status, "rank": self.worker.rank}
        if self.worker.num_shards > 1:
            rec["shard"] = self.worker.shard
        rec.update(fields, finished_at=time.time())
        return rec

    def record(self, item: Item, status: str, **fields) -> None:
        """An image's record from the loop (a failure): committed in its turn on the commit stage."""
        rec, code = self.make_record(item, status, **fields), OK if status == "ok" else FAILED
        row = Row(rec, code, item.prompt, self.sources.pop(item.id, 0), seconds=float(fields.get("seconds", 0.0)))
        self.commits.submit(self.commit_rows, [row])

    def commit_rows(self, rows: list[Row]) -> None:
        """(commit thread) The rows' manifest lines and index entries, then their log lines and counts."""
        self.records.append_many(rows)
        for row in rows:
            self.recorded(row.record)

    def recorded(self, rec: dict) -> None:
        self.summary.add(rec)
        self.note(format_row(rec) if rec["status"] == "ok" else f"failed {rec['id']}: {rec.get('error')}")
        if self.bar is not None:
            self.bar.update(1)
            n = self.summary.n_done + self.summary.n_failed
            self.bar.set_postfix(img_per_h=f"{3600 * n / max(time.perf_counter() - self.t_start, 1e-9):.0f}")

    def flush(self, wait: bool = False) -> None:
        """Measures the finished images waiting in ``to_write`` (the VAE decode: in the loop) and hands them to the
        commit stage; ``wait``: until everything handed over is committed (before a checkpoint and at the end)."""
        if self.to_write:
            group, self.to_write = self.to_write, []
            measured = self.measure(self.model, self.cfg, group, self.runtime)
            blobs = self.shard_out.encode(group) if self.shard_out is not None else None  # starts now
            self.commits.submit(self.write_group, group, measured, blobs)
        if wait:
            self.commits.drain()

    def write_group(self, group: list[Done], measured: list, blobs: list | None) -> None:
        """(commit thread) A group's records (the shards layout: encoding since ``flush``) written — durable —
        then committed."""
        if self.shard_out is None:
            write_folders(self.cfg, self.out, group, measured, self.commit_done, self.folder.tmp)
            return
        rows = []
        for d, fields, (shard, offset) in self.shard_out.write(group, measured, blobs):
            rec = self.make_record(d.item, "ok", **fields)
            rows.append(Row(rec, OK, d.item.prompt, d.source, shard, offset, float(fields["seconds"])))
        self.commit_rows(rows)

    def commit_done(self, d: Done, **fields) -> None:
        """(commit thread) The folders layout: one image's files are written; its record now."""
        rec = self.make_record(d.item, "ok", **fields)
        self.commit_rows([Row(rec, OK, d.item.prompt, d.source, seconds=float(fields["seconds"]))])

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
            self.sources.pop(item.id, None)
            return
        if isinstance(event, Failed):
            self.record(item, "failed", error=event.error)
            return
        if self.metrics_logger is not None:
            self.metrics_logger.log_metrics(image_log_metrics(event.inversion), step=self.logged)
            self.logged += 1
        self.summary.skipped_steps += int(event.inversion.meta.get("skipped_steps", 0))
        self.to_write.append(Done(item, px, event.inversion, event.seconds, self.sources.pop(item.id, 0)))
        if len(self.to_write) >= self.engine.rows:
            self.flush()

    def loop(self) -> None:
        w, c = self.worker, self.cfg
        self.note(
            f"{w.name} of {w.world} rank(s) × {w.num_shards} shard(s): {self.n_todo} to invert, "
            f"{self.summary.skipped + self.shard_done_estimate} already done, into {self.out} on {self.fabric.device} "
            f"at {self.size}px, precision "
            f"{self.runtime.precision}, T={c.inversion.num_ddim_steps}, N={c.inversion.num_inner_steps}, "
            f"{self.engine.rows} rows × {self.engine.num_slots} slots, launched by {self.place.environment}"
        )
        self.note(format_header(c.inversion.method))
        show = w.rank == 0 and c.output.progress_bar and not self.quiet
        self.bar = progress_bar(self.log, self.n_todo, f"{w.name} inverting", show)
        for event in self.engine.run(self.admissions()):
            self.on_event(event)
        self.warn_coverage()
        self.flush(wait=True)
        if self.shard_out is not None:
            self.shard_out.finish()  # the last shard renamed to .tar with its index
        self.folder.checkpoint.unlink(missing_ok=True)  # only now: everything it held is written

    def close(self) -> None:
        """Every clean-up step runs, and none hides the error that stopped the run (each failure is one line)."""
        steps = [self.commits.close, lambda: close_bar(self.log, self.bar)]  # what was handed over is committed
        if self.metrics_logger is not None:
            steps.append(lambda: self.metrics_logger.finalize("preempted" if self.summary.preempted else "success"))
        if getattr(self, "captions", None) is not None:
            steps.append(self.captions.close)
        if self.shard_out is not None:
            steps.append(self.shard_out.close)
        steps += [self.folder.release, lambda: close_logger(self.log)]
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 — a clean-up error must not replace the run's own
                self.log.warning(f"warning: while closing: {type(e).__name__}: {e}")


def run_rank(
    cfg: RunConfig,
    place: Placement,
    stop: StopFlag,
    overwrite=False,
    retry_failed=False,
    quiet=False,
    load_model=None,
    engine_factory=None,
    measure=None,
) -> RunSummary:
    """This worker's whole run (module docstring). ``load_model``, ``engine_factory`` (``SlotEngine``'s
    signature) and ``measure`` (``invert_outputs.measure_group``'s) replace the model, the engine and the
    per-group decode and metrics: for the data-plane benchmark (``scripts/bench_data_plane.py``)."""
    if load_model is None:
        from nti_lightning.models import load_model
    w = InvertWorker(cfg, place, stop, quiet, engine_factory, measure)
    try:
        try:
            w.check_and_claim(overwrite)  # 1–2
            w.build(load_model)  # 3
            w.start()
        except BaseException as e:
            if w.worker.rank == 0 and w.worker.world > 1 and w.folder.claims:
                w.folder.publish_ready(place.session, error=f"{type(e).__name__}: {e}")
            raise
        t0 = time.perf_counter()
        w.load_index(retry_failed)  # 4
        t1 = time.perf_counter()
        w.count_items()
        w.open_outputs()
        t2 = time.perf_counter()
        w.last_save = time.monotonic()
        w.resume()  # 5
        t3 = time.perf_counter()
        w.untouched = w.untouched_sources()
        w.note(
            f"{w.worker.name}: bookkeeping {time.perf_counter() - t0:.2f} s (index {t1 - t0:.2f} s, inputs and "
            f"outputs {t2 - t1:.2f} s, checkpoint {t3 - t2:.2f} s, done input shards {time.perf_counter() - t3:.2f} s)"
        )
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
