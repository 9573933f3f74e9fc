"""One worker of ``nti invert``: its shard of the images through the slot engine, with outputs and checkpoints.

Written once, top to bottom (``run_worker``): (1) model and engine on this rank's device, (2) the output
folder — lock, identity, resolved config, (3) this worker's items minus what is done, (4) resume from its
checkpoint, (5) the engine loop: images stream in as slots free up, finished ones are written in groups,
the whole state is checkpointed every ``output.checkpoint_every_s`` and on a stop signal, (6) summary.

Resilience: a bad image or caption is recorded as failed and the run goes on; every file is written as temp
file + rename and the manifest is append-only. A checkpoint holds every in-flight image; on resume, images
that finished after it (their manifest rows are newer than the checkpoint) run again without being written
again, so the engine sees exactly the stream it saw and the resumed run is bit-identical to an uninterrupted
one. Scale-out: the items are split statically (``items.is_mine``); ranks never exchange gradients, and the
only collective is the start-up barrier (a collective per batch would make a rank wait for the slowest).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch

from nti_lightning.api import image_size_for
from nti_lightning.config import RunConfig, config_to_yaml, resolve_batch_size
from nti_lightning.data.items import SAMPLES_DIR, Item, caption_coverage, iter_items, read_captions
from nti_lightning.data.shards import is_shard_pattern
from nti_lightning.engine.batch_probe import probe_batch_size
from nti_lightning.engine.runtime import Runtime
from nti_lightning.engine.slots import Admission, Failed, SlotEngine, Tick
from nti_lightning.exit_codes import EXIT_PREEMPTED
from nti_lightning.run import checkpoint as ckpt
from nti_lightning.run.identity import check_output_identity, run_identity
from nti_lightning.run.items import decode, is_mine, lost_inversions, prefetched
from nti_lightning.run.lock import OutputLock
from nti_lightning.run.outputs import (
    Done,
    RunSummary,
    format_header,
    format_row,
    image_log_metrics,
    make_metrics_logger,
    write_group,
)
from nti_lightning.run.signals import Preempted, StopFlag, requeue_slurm_job
from nti_lightning.store.files import atomic_write_bytes, item_dir, remove_stale_tmp
from nti_lightning.store.manifest import ManifestIndex, append_manifest, manifest_name
from nti_lightning.text import PromptError, check_prompt


def worker_name(cfg: RunConfig, rank: int) -> str:
    """``rank{r}``, or ``shard{s}.rank{r}`` in a job array: names this worker's log file and progress bar."""
    return f"shard{cfg.data.shard_index}.rank{rank}" if cfg.data.num_shards > 1 else f"rank{rank}"


def summary_path(out_dir: Path, cfg: RunConfig, rank: int) -> Path:
    """Where a worker leaves its final counts (``RunSummary``) for the process that launched it."""
    return Path(out_dir) / "logs" / f"summary.{worker_name(cfg, rank)}.json"


def log_line(line: str) -> str:
    """A line of a per-rank log file: timestamp, text, newline."""
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n"


def launch_environment(fabric) -> str:
    """Which launcher Lightning detected: SLURMEnvironment (srun), TorchElasticEnvironment (torchrun),
    LightningEnvironment (Lightning's own ``ddp``/``ddp_spawn`` launch), or "none (single process)"."""
    env = getattr(fabric.strategy, "cluster_environment", None)
    return type(env).__name__ if env is not None else "none (single process)"


def pixel_hash(pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def resolve_inputs(cfg: RunConfig) -> tuple[list[str], str | None]:
    if cfg.data.images:
        return list(cfg.data.images), cfg.data.captions
    return [str(SAMPLES_DIR)], cfg.data.captions or str(SAMPLES_DIR / "captions.jsonl")


class Worker:
    """The state of one worker's run; ``run_worker`` is its whole story."""

    def __init__(self, fabric, cfg: RunConfig, out_dir: Path, stop: StopFlag, quiet: bool) -> None:
        self.fabric, self.cfg, self.out_dir, self.stop, self.quiet = fabric, cfg, out_dir, stop, quiet
        self.rank, self.world = fabric.global_rank, fabric.world_size
        self.shard, self.num_shards = cfg.data.shard_index, cfg.data.num_shards
        self.name = worker_name(cfg, self.rank)
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.log_file = open(out_dir / "logs" / f"{self.name}.log", "a", encoding="utf-8")  # noqa: SIM115
        self.bar = None  # rank 0's progress bar: lines are then written above it
        self.summary = RunSummary(out_dir)
        self.manifest = out_dir / manifest_name(self.rank, self.world, self.shard, self.num_shards)
        self.ckpt_path = ckpt.checkpoint_path(out_dir, self.rank, self.shard)
        self.inflight: dict[str, tuple[Item, torch.Tensor, float, str]] = {}  # id → item, pixels, t0, hash
        self.to_write: list[Done] = []
        self.resumed: set[str] = set()  # ids restored in flight from the checkpoint: not in the stream again
        self.ghost_after: float | None = None  # checkpoint time: rows newer than it are re-run, not re-written
        self.t_start = time.perf_counter()
        self.metrics_logger = None
        self.logged = 0

    def log(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        self.log_file.write(log_line(line))
        self.log_file.flush()
        if not self.quiet and self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        """A warning: in the log, and on stderr even with --quiet."""
        self.log(f"warning: {text}")
        if self.quiet:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def record(self, item: Item, status: str, **fields) -> dict:
        rec = {"id": item.id, "source": item.path, "prompt": item.prompt, "status": status, "rank": self.rank}
        if self.num_shards > 1:
            rec["shard"] = self.shard
        rec.update(fields, finished_at=time.time())
        append_manifest(self.manifest, rec)
        self.summary.add(rec)
        self.log(format_row(rec) if status == "ok" else f"failed {item.id}: {rec.get('error')}")
        if self.bar is not None:
            self.bar.update(1)
            n = self.summary.n_done + self.summary.n_failed
            self.bar.set_postfix(img_per_h=f"{3600 * n / max(time.perf_counter() - self.t_start, 1e-9):.0f}")
        return rec

    # -- 1. model and engine -------------------------------------------------------------------------------

    def build(self, load_model) -> None:
        cfg = self.cfg
        self.model = load_model(
            cfg.model.spec, device=self.fabric.device, dtype=cfg.model.dtype, config_dir=cfg.model.config_dir
        )
        if cfg.model.compile != "none":  # after the fingerprint was taken; attribute access passes through
            self.model.unet = torch.compile(self.model.unet, mode=cfg.model.compile)
        self.runtime = Runtime(self.fabric)
        self.size = image_size_for(self.model, cfg.inversion)
        rows = cfg.inversion.batch_size
        if rows == "auto":
            rows = (
                probe_batch_size(self.model, cfg.inversion, self.runtime, self.size)
                if self.model.device.type == "cuda"
                else resolve_batch_size("auto", self.model.device)
            )
            self.log(f"inversion.batch_size=auto → {rows} rows per UNet call on {self.model.device}")
        self.cfg = cfg = replace(cfg, inversion=replace(cfg.inversion, batch_size=int(rows)))
        self.engine = SlotEngine(
            self.model, cfg.inversion, int(rows), self.runtime, slots=cfg.inversion.slots,
            pad=cfg.model.compile != "none", image_size=self.size,
        )  # fmt: skip
        if self.rank == 0:
            T = cfg.inversion.num_ddim_steps
            self.metrics_logger = make_metrics_logger(cfg.output.logger, self.out_dir / "logs", self.shard, T, self.log)

    def checkpoint_identity(self) -> dict:
        return {
            "run": self.identity,
            "rows": self.engine.rows,
            "slots": self.engine.num_slots,
            "batch_invariant": self.cfg.inversion.batch_invariant,
            "compile": self.cfg.model.compile,  # compiled kernels round differently: resume exactly or start over
        }

    # -- 2. the output folder ------------------------------------------------------------------------------

    def claim_folder(self, overwrite: bool, on_started: Callable[[], None] | None) -> None:
        self.identity = run_identity(self.cfg, self.model)
        self.lock = OutputLock(self.out_dir, self.shard) if self.rank == 0 else None
        if self.lock is not None:
            self.lock.acquire(self.log)
            remove_stale_tmp(self.out_dir, owned=False)
            check_output_identity(self.out_dir, self.identity, overwrite)
            cfg_yaml = config_to_yaml(self.cfg)
            atomic_write_bytes(self.out_dir / f"config.shard{self.shard}.yaml" if self.num_shards > 1 else
                               self.out_dir / "config.yaml", cfg_yaml.encode())  # fmt: skip
        self.fabric.barrier()  # the only collective: before it, rank 0 may delete stale results (--overwrite)
        if on_started is not None:
            on_started()
        if self.rank != 0:
            check_output_identity(self.out_dir, self.identity, overwrite=False)
        self.previous = ManifestIndex(self.out_dir)  # id → latest status and inversion path, on disk

    # -- 3. items ------------------------------------------------------------------------------------------

    def count_items(self, retry_failed: bool) -> None:
        """Pass 1 over the ids (streamed, never held): total, this worker's todo, and what is already done."""
        self.retry_failed = retry_failed
        self.lost: set[str] = set()
        self.images, captions_path = resolve_inputs(self.cfg)
        self.captions, warnings = read_captions(captions_path) if captions_path else (None, [])
        for w in warnings:
            self.warn(w)
        for path in self.images:
            if not os.path.exists(path) and not is_shard_pattern(path):  # a pattern's shards: list_shards checks
                raise FileNotFoundError(f"input {path} does not exist; fix --images (or data.images)")
        total = self.n_todo = uncaptioned = 0
        self.skipped_failed = 0
        example = None
        for k, item in enumerate(iter_items(self.images, self.captions, *self.item_options())):
            total += 1
            if item.error is None and not item.captioned and item.prompt == self.cfg.data.default_prompt:
                uncaptioned += 1
                example = example or item.id
            if not is_mine(k, self.shard, self.num_shards, self.rank, self.world):
                continue
            if lost_inversions(self.out_dir, self.previous, item.id):
                self.lost.add(item.id)
            prev = self.previous.get(item.id)
            if self.already_done(item):
                self.summary.skipped += 1
                self.skipped_failed += prev.status != "ok"
            else:
                self.n_todo += 1
        if self.captions is not None and self.rank == 0 and total:
            default = self.cfg.data.default_prompt
            if w := caption_coverage(captions_path, self.captions, total, uncaptioned, example, default):
                self.warn(w)
        if self.rank == 0:
            progress = {"total": total, "num_shards": self.num_shards, "world_size": self.world}
            atomic_write_bytes(self.out_dir / "progress.json", json.dumps(progress).encode())
        if total == 0:
            raise FileNotFoundError(f"no images found in {', '.join(self.images)}; give image files, folders or lists")

    def item_options(self) -> tuple:
        d = self.cfg.data
        return d.default_prompt, d.caption_column, d.image_column

    def already_done(self, item: Item) -> bool:
        prev = self.previous.get(item.id)
        if prev is None:
            return False
        if prev.status == "ok":
            return item.id not in self.lost
        return not self.retry_failed and prev.prompt == item.prompt  # a changed caption is a fix: retried

    def is_ghost(self, item_id: str) -> bool:
        """Finished after the checkpoint this run resumed from: run again for an identical stream, not written."""
        prev = self.previous.get(item_id)
        return self.ghost_after is not None and prev is not None and prev.finished_at >= self.ghost_after

    def pending(self) -> Iterator[tuple[int, Item]]:
        """Pass 2: this worker's items still to do, in stream order, with their prompts."""
        for k, item in enumerate(iter_items(self.images, self.captions, *self.item_options())):
            if not is_mine(k, self.shard, self.num_shards, self.rank, self.world) or item.id in self.resumed:
                continue
            if self.already_done(item) and not self.is_ghost(item.id):
                continue
            remove_stale_tmp(item_dir(self.out_dir, item.id, self.cfg.output.subdirs), owned=True)
            yield k, item

    def admissions(self) -> Iterator[Admission]:
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
            self.inflight[item.id] = (item, px, time.perf_counter(), pixel_hash(px))
            yield Admission(item.id, px, item.prompt)

    # -- 4. resume -----------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Loads this worker's checkpoint into the engine, if it is one of this run's; re-checks every
        in-flight image's pixels (a file changed since is started over)."""
        saved = ckpt.load_checkpoint(self.ckpt_path)
        if saved is None:
            return
        diff = ckpt.checkpoint_mismatch(saved, self.checkpoint_identity())
        if not diff:
            try:
                self.engine.load_state_dict(saved["engine"])
            except (ValueError, KeyError, RuntimeError) as e:
                diff = [f"engine state ({e})"]
        if diff:
            self.log(f"ignoring checkpoint {self.ckpt_path}: made with other settings ({', '.join(diff)} differ); "
                     "its images start over")  # fmt: skip
            self.ckpt_path.unlink(missing_ok=True)
            return
        for item_id, saved_item in saved["items"].items():
            item = Item(**saved_item["item"])
            px = decode(item, self.size)
            if isinstance(px, Exception) or pixel_hash(px) != saved_item["sha256"]:
                self.engine.discard(lambda tag, i=item_id: tag == i)
                self.log(f"{item.label}: changed since the checkpoint; it starts over")
                continue
            self.inflight[item_id] = (item, px, time.perf_counter(), saved_item["sha256"])
            self.resumed.add(item_id)
        self.ghost_after = saved["saved_at"]
        self.summary.resumed += 1
        self.log(f"resuming {len(self.inflight)} in-flight image(s) from {self.ckpt_path}")

    def save_checkpoint(self) -> None:
        self.flush()
        items = {
            i: {"item": asdict(replace(it, data=None)), "sha256": sha}  # a shard item's bytes: read again
            for i, (it, _, _, sha) in self.inflight.items()
            if i in self.engine.tags
        }
        ckpt.save_checkpoint(self.ckpt_path, self.checkpoint_identity(), self.engine.state_dict(), items)
        self.last_save = time.monotonic()

    # -- 5. the loop ---------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Writes the finished images waiting in ``to_write`` (before every checkpoint: a kill then loses none)."""
        if self.to_write:
            group, self.to_write = self.to_write, []
            write_group(self.model, self.cfg, self.out_dir, group, self.runtime, self.record)

    def on_event(self, event) -> None:
        if isinstance(event, Tick):
            if self.lock is not None:
                self.lock.heartbeat()
            every = self.cfg.output.checkpoint_every_s
            if self.stop.requested:
                self.save_checkpoint()
                raise Preempted(f"signal {self.stop.signum} after UNet call {event.number}")
            if time.monotonic() - self.last_save >= every:
                self.save_checkpoint()
            if self.bar is not None:
                self.bar.set_description(f"{self.name} {event.active} in flight", refresh=False)
            return
        item, px, t0, _ = self.inflight.pop(event.tag)
        if self.is_ghost(item.id):
            return
        if isinstance(event, Failed):
            self.record(item, "failed", error=event.error)
            return
        if self.metrics_logger is not None:
            self.metrics_logger.log_metrics(image_log_metrics(event.inversion), step=self.logged)
            self.logged += 1
        self.summary.skipped_steps += int(event.inversion.meta.get("skipped_steps", 0))
        self.to_write.append(Done(item, px, event.inversion, time.perf_counter() - t0))
        if len(self.to_write) >= self.engine.rows:
            self.flush()

    def loop(self) -> None:
        self.last_save = time.monotonic()
        self.log(
            f"{self.name} of {self.world} rank(s) × {self.num_shards} shard(s): {self.n_todo} to invert, "
            f"{self.summary.skipped} already done, into {self.out_dir} on {self.fabric.device} at {self.size}px, "
            f"precision {self.cfg.trainer.precision}, T={self.cfg.inversion.num_ddim_steps}, "
            f"N={self.cfg.inversion.num_inner_steps}, {self.engine.rows} rows × {self.engine.num_slots} slots, "
            f"cluster environment {launch_environment(self.fabric)}"
        )
        self.log(format_header())
        if self.rank == 0 and self.cfg.output.progress_bar and not self.quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.n_todo, unit="img", desc=f"{self.name} inverting", dynamic_ncols=True,
                            file=sys.stderr)  # fmt: skip
        for event in self.engine.run(self.admissions()):
            self.on_event(event)
        self.flush()
        self.ckpt_path.unlink(missing_ok=True)  # only now: everything it held is written

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics_logger is not None:
            self.metrics_logger.finalize("preempted" if self.summary.preempted else "success")
        if getattr(self, "previous", None) is not None:
            self.previous.close()
        if getattr(self, "captions", None) is not None:
            self.captions.close()
        if getattr(self, "lock", None) is not None:
            self.lock.release()
        self.log_file.close()


def run_worker(fabric, cfg, out_dir, stop, overwrite, retry_failed, quiet, load_model, on_started=None) -> RunSummary:
    """This worker's whole run (see the module docstring)."""
    w = Worker(fabric, cfg, out_dir, stop, quiet)
    try:
        w.build(load_model)  # 1
        w.claim_folder(overwrite, on_started)  # 2
        w.count_items(retry_failed)  # 3
        w.resume()  # 4
        try:
            w.loop()  # 5
        except Preempted as e:
            interrupted = stop.signum == signal.SIGINT
            w.summary.preempted, w.summary.interrupted = not interrupted, interrupted
            w.log(
                f"{w.name}: {'interrupted' if interrupted else 'preempted'} ({e}); state saved to {w.ckpt_path}; "
                "rerun the same command to resume"
            )
            if not interrupted and w.rank == 0 and cfg.output.requeue and os.environ.get("SLURM_JOB_ID"):
                requeue_slurm_job(w.log)
        s = w.summary  # 6
        s.skipped_failed, s.rank = w.skipped_failed, w.rank
        s.save(summary_path(out_dir, cfg, w.rank))  # for the rank that launched this one: one combined report
        w.log(
            f"{w.name}: {s.n_done} inverted, {s.n_failed} failed, {s.skipped} already done, {s.resumed} resumed, "
            f"{s.skipped_steps} loss-scale-skipped step(s); manifest {w.manifest}"
        )
        return s
    finally:
        w.close()


__all__ = ["run_worker", "worker_name", "log_line", "EXIT_PREEMPTED"]
