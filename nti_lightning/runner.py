"""The dataset run behind ``nti invert``: every image inverted once, results and failures in a manifest.

Written once, top to bottom: (1) Fabric launch and model, (2) output folder and its identity, (3) items of
this worker's static shard minus those already done, (4) batches: load → invert (resuming a mid-batch
checkpoint) → reconstruct → metrics → save, (5) summary.

Resilience: a bad image or caption is recorded as failed and the run goes on; every file is written as temp
file + rename and the manifest is append-only, so a kill at any moment loses at most the batch in flight —
and not even that, because each worker saves its batch's loop state to ``checkpoints/`` every
``output.checkpoint_every`` timesteps and when SIGTERM/SIGUSR1 arrives (the handler only sets a flag; the
loop checks it between timesteps, saves, and exits with ``EXIT_PREEMPTED``). Scale-out: the items are split
statically, ``k mod num_shards`` → job, then ``(k div num_shards) mod world`` → rank; ranks never exchange
gradients, and the only collective is the start-up barrier (see shared LIGHTNING-NOTES).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch

from nti_lightning.api import (
    ddim_baseline_latents,
    image_size_for,
    invert_batch,
    prepare_batch,
    reconstruction_latents,
)
from nti_lightning.config import RunConfig, config_to_yaml
from nti_lightning.dataset import SAMPLES_DIR, CaptionError, Item, iter_items, read_captions, temp_db
from nti_lightning.engine import decode_latents
from nti_lightning.image import ImageError, prepare_image, tensor_to_image
from nti_lightning.inversion import save_inversion
from nti_lightning.metrics import image_metrics, latent_mse_value, make_strip
from nti_lightning.nulltext import LoopState, NullTextInversionModule
from nti_lightning.runtime import Runtime, resolve_precision
from nti_lightning.text import PromptError, check_prompt

EXIT_PREEMPTED = 75
"""Exit status of ``nti invert`` after SIGTERM/SIGUSR1: state saved, rerun to resume (sysexits EX_TEMPFAIL)."""
CHECKPOINT_FORMAT = 1


class OutputMismatchError(RuntimeError):
    """The output folder holds results of a different model or hyperparameters."""


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived; the batch state is saved."""


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------

_HOST = socket.gethostname().replace(".", "-")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_image(path: Path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def remove_stale_tmp(folder: Path, owned: bool) -> None:
    """Deletes temp files a killed writer left in ``folder``: all of them where this worker owns the folder
    (an image's folder of its shard), else only those of dead processes on this host."""
    for p in folder.glob(".*.tmp"):
        if not owned:
            writer = p.name.rsplit(".", 2)[-2]  # "<host>-<pid>"
            host, _, pid = writer.rpartition("-")
            if host != _HOST or not pid.isdigit() or _pid_alive(int(pid)):
                continue
        p.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def manifest_name(rank: int, world_size: int, shard: int = 0, num_shards: int = 1) -> str:
    if num_shards > 1:
        return f"manifest.shard{shard}.rank{rank}.jsonl"
    return "manifest.jsonl" if world_size == 1 else f"manifest.rank{rank}.jsonl"


def append_manifest(path: Path, record: dict) -> None:
    """One JSON line, appended and fsynced: a crash leaves at most one partial last line (skipped on read)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def iter_manifest_records(out_dir: str | os.PathLike) -> Iterator[dict]:
    """Every record of a run's ``manifest*.jsonl`` files, in file-name then line order; lines cut by a crash
    (and anything that is not a record with an id) are skipped."""
    for p in sorted(Path(out_dir).glob("manifest*.jsonl")):
        with open(p, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if isinstance(rec, dict) and "id" in rec:
                    yield rec


def read_manifest(out_dir: str | os.PathLike) -> dict[str, dict]:
    """All manifest*.jsonl lines of a run, merged; the latest record of an id wins."""
    records: dict[str, dict] = {}
    for rec in iter_manifest_records(out_dir):
        prev = records.get(rec["id"])
        if prev is None or rec.get("finished_at", 0) >= prev.get("finished_at", 0):
            records[rec["id"]] = rec
    return records


class Previous(NamedTuple):
    """What a rerun needs of an id's latest manifest record."""

    status: str | None
    inversion: str | None  # paths.inversion of an "ok" record
    error: str | None  # of a record that is not "ok"


class ManifestIndex:
    """The latest record of every id of a run's ``manifest*.jsonl`` reduced to ``Previous`` (status, inversion
    path, error), in a temporary SQLite database: a rerun over 10^7 images decides what to skip without holding
    the ~1 KB records in memory. Same merge as ``read_manifest``: files in name order, the latest
    ``finished_at`` wins (on a tie the later line), a line cut by a crash is skipped."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self._db = temp_db()
        self._db.execute(
            "CREATE TABLE m (id TEXT PRIMARY KEY, status TEXT, inversion TEXT, error TEXT, finished_at REAL) "
            "WITHOUT ROWID"
        )
        self._db.executemany(
            "INSERT INTO m VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
            "inversion = excluded.inversion, error = excluded.error, finished_at = excluded.finished_at "
            "WHERE excluded.finished_at >= m.finished_at",
            self._rows(Path(out_dir)),
        )

    @staticmethod
    def _rows(out_dir: Path) -> Iterator[tuple]:
        for rec in iter_manifest_records(out_dir):
            status = rec.get("status")
            paths = rec.get("paths")
            inversion = paths.get("inversion") if status == "ok" and isinstance(paths, dict) else None
            error = None if status == "ok" else rec.get("error", "")
            yield rec["id"], status, inversion, error, rec.get("finished_at", 0)

    def get(self, item_id: str) -> Previous | None:
        row = self._db.execute("SELECT status, inversion, error FROM m WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else Previous(*row)

    def count(self, status: str = "ok") -> int:
        return self._db.execute("SELECT COUNT(*) FROM m WHERE status = ?", (status,)).fetchone()[0]

    def failed(self) -> Iterator[tuple[str, str | None]]:
        """(id, error) of every id whose latest record is not "ok", sorted by id (streamed)."""
        return iter(self._db.execute("SELECT id, error FROM m WHERE status IS NOT 'ok' ORDER BY id"))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM m").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def item_relpath(item_id: str, subdirs: bool = False) -> str:
    """``<id>`` or, with ``output.subdirs``, ``<ab>/<id>`` where ab are the first hex digits of sha1(id)."""
    if not subdirs:
        return item_id
    return f"{hashlib.sha1(item_id.encode()).hexdigest()[:2]}/{item_id}"


def item_dir(out_dir: Path, item_id: str, subdirs: bool = False) -> Path:
    return out_dir / item_relpath(item_id, subdirs)


# ---------------------------------------------------------------------------------------------------------
# Mid-batch checkpoints (one file per worker, never fabric.save: that writes on rank 0 only and barriers)
# ---------------------------------------------------------------------------------------------------------


def checkpoint_path(out_dir: Path, rank: int, shard: int = 0) -> Path:
    return out_dir / "checkpoints" / f"shard{shard}.rank{rank}.pt"


def batch_identity(run_id: dict, cfg: RunConfig, items: list[Item], pixels: torch.Tensor) -> dict:
    """What a checkpoint must match to be resumed: the run's identity, the batch's ids, prompts and pixels."""
    return {
        "run": run_id,
        "batch_size": cfg.inversion.batch_size,
        "batch_invariant": cfg.inversion.batch_invariant,
        "compile": cfg.model.compile,  # compiled kernels round differently: resume exactly or start over
        "ids": [it.id for it in items],
        "prompts": [it.prompt for it in items],
        "pixels_sha256": hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).hexdigest(),
    }


def save_checkpoint(path: Path, identity: dict, module: NullTextInversionModule, state: LoopState, scaler) -> None:
    """Atomically writes the whole mid-batch state: module (∅_T…∅_1 so far) + loop state (+ GradScaler)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "identity": json.dumps(identity, sort_keys=True),
        "module": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "state": {
            "step_index": state.step_index,
            "z_bar": state.z_bar.detach().cpu(),
            "failed": state.failed.cpu(),
            "inner_steps": state.inner_steps.cpu(),
            "final_loss": state.final_loss.cpu(),
            "skipped_steps": state.skipped_steps.cpu(),
            "unet_calls": dict(state.unet_calls),
        },
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # a truncated file cannot happen (atomic writes), but a foreign one can
        return {"format": None}
    return ck


def checkpoint_mismatch(ck: dict, identity: dict) -> list[str]:
    """Names what differs between a checkpoint and the batch about to run ([] = resumable)."""
    if ck.get("format") != CHECKPOINT_FORMAT:
        return ["format"]
    old = json.loads(ck["identity"])
    diff = [k for k in identity if k != "run" and old.get(k) != identity[k]]
    diff += [f"run.{k}" for k in identity["run"] if old.get("run", {}).get(k) != identity["run"][k]]
    return diff


# ---------------------------------------------------------------------------------------------------------
# Signals: the handler only sets a flag; the loop checks it between timesteps and batches
# ---------------------------------------------------------------------------------------------------------


class StopFlag:
    """Installs SIGTERM/SIGUSR1/SIGUSR2 handlers that record the signal; ``restore()`` puts the old ones back.
    SIGUSR1 is SLURM's ``--signal=USR1@300``, SIGUSR2 submitit's, SIGTERM scancel's and torchrun's."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, n))

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}
        self._forward_to: Callable[[], list[int]] | None = None
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, the run is then only kill-safe
                break

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        try:  # never raise into the interrupted code
            for pid in self._forward_to() if self._forward_to is not None else ():
                try:
                    os.kill(pid, signum)
                except OSError:  # exited meanwhile
                    pass
        except Exception:
            pass

    def forward(self, pids: Callable[[], list[int]]) -> None:
        """Passes every stop signal on to ``pids()``: the ranks this process launched (``ddp`` without
        srun/torchrun, ``ddp_spawn``), so that ``kill <launcher>`` stops and saves every rank, not only rank 0.
        A signal that came before the ranks existed is passed on now."""
        self._forward_to = pids
        if self.signum is not None:
            self._handle(self.signum, None)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def requeue_slurm_job(log) -> None:
    """``scontrol requeue`` this SLURM job (or array task), as Lightning's Trainer does on SIGUSR1."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return
    try:
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        log(f"scontrol requeue {job}: {'ok' if res.returncode == 0 else res.stderr.strip()}")
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"scontrol requeue {job} failed: {e}")


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


SUMMARY_ROWS = 1000


@dataclass
class RunSummary:
    """This process's counts; ``done``/``failed`` keep the first ``SUMMARY_ROWS`` records each (the manifest has
    them all), so a rank that inverts millions of images does not grow with them."""

    output: Path
    n_done: int = 0
    n_failed: int = 0
    done: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    skipped: int = 0
    preempted: bool = False
    resumed: int = 0
    skipped_steps: int = 0

    def add(self, rec: dict) -> None:
        ok = rec["status"] == "ok"
        self.n_done += ok
        self.n_failed += not ok
        rows = self.done if ok else self.failed
        if len(rows) < SUMMARY_ROWS:
            rows.append(rec)


def run_identity(cfg: RunConfig, model) -> dict:
    """What must not change between runs writing into one folder."""
    return {
        "model_fingerprint": model.fingerprint,
        "model_source": model.source,
        "inversion": {k: v for k, v in asdict(cfg.inversion).items() if k not in ("batch_size", "batch_invariant")},
        "image_size": image_size_for(model, cfg.inversion),
        "precision": cfg.trainer.precision,
    }


def check_output_identity(out_dir: Path, identity: dict, overwrite: bool) -> None:
    path = out_dir / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != identity:
            if not overwrite:
                diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                raise OutputMismatchError(
                    f"{out_dir} holds results made with different settings ({', '.join(diff)} differ: "
                    f"{ {k: old.get(k) for k in diff} } vs { {k: identity.get(k) for k in diff} }). "
                    "Use another --output, or pass --overwrite to start this folder over."
                )
            for p in out_dir.glob("manifest*.jsonl"):
                p.unlink()
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    atomic_write_bytes(path, json.dumps(identity, indent=2, sort_keys=True).encode())


def resolve_inputs(cfg: RunConfig) -> tuple[list[str], str | None]:
    if cfg.data.images:
        return list(cfg.data.images), cfg.data.captions
    return [str(SAMPLES_DIR)], cfg.data.captions or str(SAMPLES_DIR / "captions.jsonl")


def make_fabric(cfg: RunConfig, launch: bool = True):
    """Fabric for ``cfg.trainer``; 16-mixed on CPU gets an explicit fp16 plugin (Fabric would run bf16)."""
    from datetime import timedelta

    import lightning as L
    from lightning.fabric.plugins import MixedPrecision
    from lightning.fabric.strategies import DDPStrategy

    tr = cfg.trainer
    kwargs: dict = {"precision": tr.precision}
    on_cpu = tr.accelerator == "cpu" or (tr.accelerator == "auto" and not torch.cuda.is_available())
    if tr.precision == "16-mixed" and on_cpu:
        kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    strategy = tr.strategy
    if strategy in ("ddp", "ddp_spawn"):
        strategy = DDPStrategy(
            start_method="popen" if strategy == "ddp" else "spawn", timeout=timedelta(seconds=tr.ddp_timeout_s)
        )
    fabric = L.Fabric(
        accelerator=tr.accelerator, devices=tr.devices, num_nodes=tr.num_nodes, strategy=strategy, **kwargs
    )
    if launch:
        fabric.launch()
    return fabric


def run_inversion(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    retry_failed: bool = False,
    quiet: bool = False,
    fabric=None,
) -> RunSummary:
    """Inverts every image of ``cfg.data`` into ``cfg.output.dir``; returns this rank's summary (rank 0's
    under ``ddp_spawn``). ``summary.preempted``: a signal stopped the run with its state saved.

    Where this process launches the other ranks itself (``trainer.strategy=ddp`` without srun/torchrun, or
    ``ddp_spawn``) it passes stop signals on to them and waits for them: the summary is ``preempted`` if any
    rank was, and ``RankFailedError`` is raised if any rank failed."""
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    if precision != cfg.trainer.precision:  # "auto": record the mode that actually runs
        cfg = replace(cfg, trainer=replace(cfg.trainer, precision=precision))
    if fabric is not None:
        return _run_rank(fabric, cfg, overwrite, retry_failed, quiet)
    stop = StopFlag()  # before the launch: a signal then reaches the ranks this process starts
    try:
        if cfg.trainer.strategy == "ddp_spawn":
            return _run_spawned(cfg, stop, overwrite, retry_failed, quiet)
        fabric = make_fabric(cfg)
        launcher = getattr(fabric.strategy, "launcher", None)
        procs = list(getattr(launcher, "procs", None) or [])  # Lightning's own `ddp` launch; none under srun
        stop.forward(lambda: [p.pid for p in procs if p.returncode is None])
        ranks: dict[int, subprocess.Popen] = {}

        def take_over() -> None:  # after the start-up barrier: every rank is up and no collective follows
            ranks.update(take_over_launched_ranks(fabric))

        try:
            summary = _run_rank(fabric, cfg, overwrite, retry_failed, quiet, stop=stop, on_started=take_over)
        except BaseException:
            # this rank failed: the ranks it launched must not run on alone (before the start-up barrier they
            # have done nothing yet and wait in it: kill them; after it, let them save first)
            stop_ranks(procs, grace_s=30.0 if ranks else 0.0)
            raise
        if ranks:
            _note(cfg, fabric.global_rank, quiet, f"waiting for the rank(s) {sorted(ranks)} this process launched")
            settle_ranks(summary, {r: p.wait() for r, p in ranks.items()})
        return summary
    finally:
        stop.restore()


def _run_spawned(cfg: RunConfig, stop: StopFlag, overwrite: bool, retry_failed: bool, quiet: bool) -> RunSummary:
    """``ddp_spawn``: this process starts every rank; each reports its outcome in shared memory, since Lightning
    returns rank 0's summary only."""
    import multiprocessing

    import torch.multiprocessing as mp

    fabric = make_fabric(cfg, launch=False)
    outcomes = mp.get_context("spawn").Array("i", [-1] * fabric.world_size, lock=False)
    stop.forward(lambda: [p.pid for p in multiprocessing.active_children()])
    summary = fabric.launch(_run_rank, cfg, overwrite, retry_failed, quiet, None, outcomes)
    settle_ranks(summary, dict(enumerate(outcomes)))
    return summary


def take_over_launched_ranks(fabric) -> dict[int, subprocess.Popen]:
    """The rank processes that Lightning's ``ddp`` (popen) launcher started from this one, by global rank (none
    under srun/torchrun: the cluster starts every rank). This process watches them from now on instead of
    Lightning's child-process observer, which SIGKILLs the launcher as soon as a child exits non-zero — with
    ``EXIT_PREEMPTED`` too, while this rank is still saving its own state."""
    procs = getattr(getattr(fabric.strategy, "launcher", None), "procs", None)
    if not procs:
        return {}
    ranks = {fabric.global_rank + i: p for i, p in enumerate(procs, 1)}
    procs.clear()  # the observer holds this very list: empty, it has nothing left to watch and ends
    return ranks


class RankFailedError(RuntimeError):
    """A rank launched by this process ended with an error (its ``logs/rank{r}.log`` says more)."""


def settle_ranks(summary: RunSummary, codes: dict[int, int]) -> None:
    """Folds the outcomes of the ranks this process launched into its summary: ``preempted`` if any rank stopped
    on a signal (exit 75, or killed by the signal before its handler was installed), an error if any failed."""
    preempted = {EXIT_PREEMPTED, *(-s for s in StopFlag.SIGNALS)}
    failed = {r: c for r, c in codes.items() if c != 0 and c not in preempted}
    summary.preempted = summary.preempted or any(c in preempted for c in codes.values())
    if failed:
        raise RankFailedError(
            f"rank(s) {sorted(failed)} failed (exit codes {failed}; a negative code is the signal that killed it); "
            f"see {summary.output}/logs/rank*.log. Finished images are recorded; rerun to complete the rest."
        )


def stop_ranks(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM (they save and exit), then SIGKILL what is still running after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.terminate() if grace_s > 0 else p.kill()
    end = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()


def worker_name(cfg: RunConfig, rank: int) -> str:
    """``rank{r}``, or ``shard{s}.rank{r}`` in a job array: names this worker's log file and progress bar."""
    return f"shard{cfg.data.shard_index}.rank{rank}" if cfg.data.num_shards > 1 else f"rank{rank}"


def log_line(line: str) -> str:
    """A line of a per-rank log file: timestamp, text, newline."""
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n"


def _note(cfg: RunConfig, rank: int, quiet: bool, line: str) -> None:
    """A line for this rank's log file (and stderr unless quiet), outside ``_run``."""
    with open(Path(cfg.output.dir) / "logs" / f"{worker_name(cfg, rank)}.log", "a", encoding="utf-8") as f:
        f.write(log_line(line))
    if not quiet:
        print(line, file=sys.stderr, flush=True)


def _run_rank(
    fabric,
    cfg: RunConfig,
    overwrite: bool,
    retry_failed: bool,
    quiet: bool,
    stop: StopFlag | None = None,
    outcomes=None,
    on_started: Callable[[], None] | None = None,
) -> RunSummary:
    from nti_lightning.models import load_model

    out_dir = Path(cfg.output.dir)
    own_stop = stop is None
    stop = stop if stop is not None else StopFlag()
    try:
        summary = _run(fabric, cfg, out_dir, stop, overwrite, retry_failed, quiet, load_model, on_started)
    finally:
        if own_stop:
            stop.restore()
    if outcomes is not None:  # ddp_spawn: this rank's outcome for the launching process
        outcomes[fabric.global_rank] = EXIT_PREEMPTED if summary.preempted else 0
    return summary


def _run(fabric, cfg, out_dir, stop, overwrite, retry_failed, quiet, load_model, on_started=None) -> RunSummary:
    rank, world = fabric.global_rank, fabric.world_size
    shard, num_shards = cfg.data.shard_index, cfg.data.num_shards
    worker = worker_name(cfg, rank)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "logs" / f"{worker}.log", "a", encoding="utf-8")  # noqa: SIM115
    bar = None  # rank 0's progress bar, once made (below): lines are then written above it

    def log(*parts) -> None:
        line = " ".join(str(p) for p in parts)
        log_file.write(log_line(line))
        log_file.flush()
        if not quiet and bar is not None:
            bar.write(line, file=sys.stderr)
        elif not quiet:
            print(line, file=sys.stderr, flush=True)

    # 1. The frozen model on this rank's device; the metrics logger (rank 0; Lightning loggers are rank-0-only)
    model = load_model(cfg.model.spec, device=fabric.device, dtype=cfg.model.dtype)
    if cfg.model.compile != "none":  # after the fingerprint was taken; attribute access passes through
        model.unet = torch.compile(model.unet, mode=cfg.model.compile)
    runtime = Runtime(fabric)
    size = image_size_for(model, cfg.inversion)
    T = cfg.inversion.num_ddim_steps
    metrics_logger = make_metrics_logger(cfg.output.logger, out_dir / "logs", shard, T, log) if rank == 0 else None

    # 2. Output folder: refuse results of other settings; record the resolved config; clean after kill -9
    identity = run_identity(cfg, model)
    if rank == 0:
        remove_stale_tmp(out_dir, owned=False)
        check_output_identity(out_dir, identity, overwrite)
        atomic_write_bytes(out_dir / "config.yaml", config_to_yaml(cfg).encode())
    fabric.barrier()  # the only collective: before it, rank 0 may delete stale results (--overwrite)
    if on_started is not None:
        on_started()
    if rank != 0:
        check_output_identity(out_dir, identity, overwrite=False)
    manifest = out_dir / manifest_name(rank, world, shard, num_shards)
    ckpt_path = checkpoint_path(out_dir, rank, shard)
    previous = ManifestIndex(out_dir)  # id → latest status and inversion path, on disk

    # 3. Items: captions, this worker's static shard, minus what is already done. Streamed, never held in
    # memory: pass 1 counts (total for progress.json, this worker's todo for the bar), pass 2 feeds the loop.
    images, captions_path = resolve_inputs(cfg)
    captions, warnings = read_captions(captions_path) if captions_path else (None, [])
    for w in warnings:
        log(f"warning: {w}")
    summary = RunSummary(out_dir)

    def mine(k: int) -> bool:  # the static split: item k → shard k mod S, then rank (k div S) mod world
        return k % num_shards == shard and (k // num_shards) % world == rank

    lost: set[str] = set()  # recorded "ok" but the inversion file is gone: redone (rare, hence a set)

    def already_done(item: Item) -> bool:  # without touching the disk: pass 1 filled ``lost``
        prev = previous.get(item.id)
        if prev is None:
            return False
        return item.id not in lost if prev.status == "ok" else not retry_failed

    total = n_todo = 0
    for k, item in enumerate(iter_items(images, None)):  # ids only: prompts are not needed to count
        total += 1
        if mine(k):
            prev = previous.get(item.id)
            if prev is not None and prev.status == "ok":
                if prev.inversion is None or not (out_dir / prev.inversion).is_file():
                    lost.add(item.id)
            if already_done(item):
                summary.skipped += 1
            else:
                n_todo += 1
    if rank == 0:
        progress = {"total": total, "num_shards": num_shards, "world_size": world}
        atomic_write_bytes(out_dir / "progress.json", json.dumps(progress).encode())

    def pending_items() -> Iterator[Item]:
        for k, item in enumerate(iter_items(images, captions, cfg.data.default_prompt)):
            if mine(k) and not already_done(item):
                remove_stale_tmp(item_dir(out_dir, item.id, cfg.output.subdirs), owned=True)
                yield item

    todo = pending_items()  # lazy: consumed by loaded() below
    for p in ckpt_path.parent.glob(f".{ckpt_path.name}.*.tmp"):  # this worker's own, cut by a kill
        p.unlink(missing_ok=True)
    pending_ckpt = load_checkpoint(ckpt_path)
    if pending_ckpt is not None and pending_ckpt.get("format") == CHECKPOINT_FORMAT:
        ids = json.loads(pending_ckpt["identity"]).get("ids", [])
        if ids and all(getattr(previous.get(i), "status", None) == "ok" for i in ids):
            pending_ckpt = None  # killed after its batch was recorded, before the checkpoint was removed
            ckpt_path.unlink(missing_ok=True)

    bar = None
    if rank == 0 and cfg.output.progress_bar and not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_todo, unit="img", desc=f"{worker} inverting", dynamic_ncols=True, file=sys.stderr)
    t_start = time.perf_counter()
    postfix: dict[str, str] = {}  # the bar's: images per hour, inner steps of the current timestep
    step = 0  # metrics-logger step: timesteps optimised by this worker in this process
    batches_started = 0  # metrics-logger "batch" column: batches of this worker in this process

    def record(item: Item, status: str, **fields) -> dict:
        rec = {"id": item.id, "source": item.path, "prompt": item.prompt, "status": status, "rank": rank}
        if num_shards > 1:
            rec["shard"] = shard
        rec.update(fields, finished_at=time.time())
        append_manifest(manifest, rec)
        summary.add(rec)
        if status != "ok":
            log(f"failed {item.id}: {rec.get('error')}")
        if bar is not None:
            bar.update(1)
            n = summary.n_done + summary.n_failed
            postfix["img_per_h"] = f"{3600 * n / max(time.perf_counter() - t_start, 1e-9):.0f}"
            bar.set_postfix(postfix)
        return rec

    # 4. Batches: images decoded ahead in a background thread while the current batch optimises
    def optimise(items: list[Item], pixels: torch.Tensor):
        nonlocal pending_ckpt, step, batches_started
        batches_started += 1
        prepared = prepare_batch(model, pixels.to(model.device), [it.prompt for it in items], cfg.inversion, runtime)
        module = NullTextInversionModule(prepared.null, T).to(model.device)
        state = None
        batch_id = batch_identity(identity, cfg, items, pixels)
        if pending_ckpt is not None:
            diff = checkpoint_mismatch(pending_ckpt, batch_id)
            if diff:
                log(
                    f"ignoring stale checkpoint {ckpt_path}: it was made for another batch or settings "
                    f"({', '.join(diff)} differ); this batch starts from timestep 0"
                )
                ckpt_path.unlink(missing_ok=True)
            else:  # kept until process() has written the batch: a second kill resumes from it again
                module.load_state_dict(pending_ckpt["module"])
                s = pending_ckpt["state"]
                state = LoopState(**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()})
                if pending_ckpt["scaler"] is not None and runtime.scaler is not None:
                    runtime.scaler.load_state_dict(pending_ckpt["scaler"])
                summary.resumed += 1
                log(f"resuming batch {batch_id['ids']} at timestep index {state.step_index}/{T} from {ckpt_path}")
            pending_ckpt = None

        def on_timestep_end(st: LoopState) -> None:
            nonlocal step
            i = st.step_index - 1
            if metrics_logger is not None:  # fixed columns: a new column makes CSVLogger rewrite its whole file
                loss, inner = st.final_loss[i].float(), st.inner_steps[i].float()  # (B,)
                metrics = {
                    "timestep": float(prepared.schedule.timesteps[i]),
                    "step_index": float(i),
                    "batch": float(batches_started - 1),
                    "images": float(len(items)),
                    "loss_mean": float(loss.mean()),
                    "loss_max": float(loss.max()),
                    "inner_steps_mean": float(inner.mean()),
                    "inner_steps_max": float(inner.max()),
                    "inner_steps_total": float(inner.sum()),
                }
                metrics_logger.log_metrics(metrics, step=step)
            step += 1
            if bar is not None:
                bar.set_description(f"{worker} t {st.step_index}/{T}", refresh=False)
                postfix["inner"] = f"{int(st.inner_steps[i].max())}/{cfg.inversion.num_inner_steps}"
                bar.set_postfix(postfix)
            every = cfg.output.checkpoint_every
            if stop.requested or (every and st.step_index % every == 0 and st.step_index < T):
                save_checkpoint(ckpt_path, batch_id, module, st, runtime.scaler)
            if stop.requested:
                raise Preempted(f"signal {stop.signum} at timestep index {st.step_index}/{T}")

        return invert_batch(
            model,
            pixels,
            [it.prompt for it in items],
            cfg.inversion,
            runtime,
            prepared=prepared,
            module=module,
            state=state,
            on_timestep_end=on_timestep_end,
        )

    def process(batch: list[tuple[Item, torch.Tensor]]) -> None:
        items = [it for it, _ in batch]
        pixels = torch.stack([px for _, px in batch])  # (B, 3, H, W)
        t0 = time.perf_counter()
        try:
            results, _ = optimise(items, pixels)
        except Preempted:
            raise
        except Exception as e:  # e.g. out of memory: record, go on with the next batch
            for it in items:
                record(it, "failed", error=f"inversion failed: {type(e).__name__}: {e}")
            ckpt_path.unlink(missing_ok=True)
            return
        ok = [(it, px, inv) for it, px, inv in zip(items, pixels, results) if inv is not None]
        for it, inv in zip(items, results):
            if inv is None:
                record(it, "failed", error="non-finite loss or latent during null-text optimisation; not saved")
        if ok:
            write_results(ok, (time.perf_counter() - t0) / len(items))
        ckpt_path.unlink(missing_ok=True)  # only now: a kill before this resumes from the checkpoint

    def write_results(ok, seconds: float) -> None:
        invs = [inv for _, _, inv in ok]
        nti_lat = reconstruction_latents(model, invs, runtime=runtime)  # (n, 4, h, w)
        z0 = torch.stack([inv.pivot_z0 for inv in invs]).to(nti_lat.device)
        nti_img = decode_latents(model, nti_lat).cpu()
        vae_img = decode_latents(model, z0).cpu()
        if cfg.output.compute_baseline:
            base_lat = ddim_baseline_latents(model, invs, cfg.inversion.guidance_scale, runtime)
            base_img = decode_latents(model, base_lat).cpu()
        for k, (it, px, inv) in enumerate(ok):
            rel = item_relpath(it.id, cfg.output.subdirs)
            d = out_dir / rel
            inv.meta.update(image={"id": it.id, "source": it.path})
            save_inversion(d / "inversion.safetensors", inv)
            metrics = {
                "nti": {"vs_input": image_metrics(nti_img[k], px), "vs_vae": image_metrics(nti_img[k], vae_img[k])},
                "vae_roundtrip_vs_input": image_metrics(vae_img[k], px),
                "nti_latent_mse": latent_mse_value(nti_lat[k], z0[k]),
                "inner_steps": int(inv.inner_steps.sum()),
                "skipped_steps": int(inv.meta.get("skipped_steps", 0)),
            }
            summary.skipped_steps += metrics["skipped_steps"]
            # input | VAE round trip (the best a latent method can reach) | [no NTI] | NTI
            pictures = [tensor_to_image(px), tensor_to_image(vae_img[k]), tensor_to_image(nti_img[k])]
            if cfg.output.compute_baseline:
                metrics["ddim_no_nti"] = {
                    "vs_input": image_metrics(base_img[k], px),
                    "vs_vae": image_metrics(base_img[k], vae_img[k]),
                }
                metrics["ddim_no_nti_latent_mse"] = latent_mse_value(base_lat[k], z0[k])
                pictures.insert(2, tensor_to_image(base_img[k]))
            atomic_save_image(d / "reconstruction.png", pictures[-1])
            paths = {"inversion": f"{rel}/inversion.safetensors", "reconstruction": f"{rel}/reconstruction.png"}
            if cfg.output.save_strip:
                atomic_save_image(d / "strip.png", make_strip(pictures))
                paths["strip"] = f"{rel}/strip.png"
            meta = {"id": it.id, "source": it.path, "prompt": it.prompt, "metrics": metrics, **inv.meta}
            atomic_write_bytes(d / "meta.json", json.dumps(meta, indent=2).encode())
            paths["meta"] = f"{rel}/meta.json"
            rec = record(it, "ok", metrics=metrics, paths=paths, seconds=round(seconds, 3))
            log(format_row(rec))

    def decode(item: Item) -> torch.Tensor | Exception:
        try:
            if item.error:
                raise ValueError(item.error)
            if item.where is not None and not os.path.isfile(item.path):
                raise ImageError(
                    f"{item.where}: image {item.path} not found; fix the path (relative paths are relative to the "
                    "list file's folder) or remove the row"
                )
            return prepare_image(item.path, size, name=item.label)
        except (ImageError, ValueError) as e:
            return e

    def loaded() -> Iterator[tuple[Item, torch.Tensor | Exception]]:
        lookahead = cfg.output.prefetch * cfg.inversion.batch_size
        if lookahead == 0:
            yield from ((it, decode(it)) for it in todo)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nti-decode") as pool:
            queue: deque = deque()
            items = iter(todo)
            for it in items:
                queue.append((it, pool.submit(decode, it)))
                if len(queue) > lookahead:
                    head, fut = queue.popleft()
                    yield head, fut.result()
            while queue:
                head, fut = queue.popleft()
                yield head, fut.result()

    log(
        f"{worker} of {world} rank(s) × {num_shards} shard(s): {n_todo} to invert, {summary.skipped} already "
        f"done, into {out_dir} on {fabric.device} at {size}px, precision {cfg.trainer.precision}, "
        f"T={T}, N={cfg.inversion.num_inner_steps}, cluster environment {launch_environment(fabric)}"
    )
    log(format_header())
    pending: list[tuple[Item, torch.Tensor]] = []
    try:
        for item, px in loaded():
            if stop.requested:
                raise Preempted(f"signal {stop.signum} between batches")
            try:
                if isinstance(px, Exception):
                    raise px
                check_prompt(model.tokenizer, item.prompt, label=item.label)
            except (ImageError, PromptError, ValueError) as e:
                record(item, "failed", error=str(e))
                continue
            pending.append((item, px))
            if len(pending) == cfg.inversion.batch_size:
                process(pending)
                pending = []
        if pending:
            process(pending)
    except Preempted as e:
        summary.preempted = True
        log(f"{worker}: preempted ({e}); state saved to {ckpt_path}; exiting with {EXIT_PREEMPTED}, rerun to resume")
        if rank == 0 and cfg.output.requeue and os.environ.get("SLURM_JOB_ID"):
            requeue_slurm_job(log)
    finally:
        if bar is not None:
            bar.close()
        if metrics_logger is not None:
            metrics_logger.finalize("preempted" if summary.preempted else "success")

    # 5. Summary
    log(
        f"{worker}: {summary.n_done} inverted, {summary.n_failed} failed, {summary.skipped} already done, "
        f"{summary.resumed} batch(es) resumed, {summary.skipped_steps} GradScaler-skipped step(s); manifest {manifest}"
    )
    todo.close()  # the item stream's temporary index, and the indexes below, are deleted on close
    previous.close()
    if captions is not None:
        captions.close()
    log_file.close()
    return summary


def launch_environment(fabric) -> str:
    """Which launcher Lightning detected: SLURMEnvironment (srun), TorchElasticEnvironment (torchrun),
    LightningEnvironment (Lightning's own ``ddp``/``ddp_spawn`` launch), or "none (single process)"."""
    env = getattr(fabric.strategy, "cluster_environment", None)
    return type(env).__name__ if env is not None else "none (single process)"


def make_metrics_logger(kind: str, root: Path, shard: int, flush_every: int, log):
    """Rank 0's Lightning logger of per-timestep loss and inner steps, in ``root/metrics_shard{shard}/version_*``:
    ``CSVLogger``, or ``TensorBoardLogger`` when ``tensorboard`` or ``tensorboardX`` is installed (otherwise CSV,
    with a warning in the log); None for "none"."""
    if kind == "none":
        return None
    name = f"metrics_shard{shard}"
    if kind == "tensorboard":
        from lightning.fabric.loggers import TensorBoardLogger

        try:
            return TensorBoardLogger(root, name=name, default_hp_metric=False)
        except ModuleNotFoundError:
            log(
                "warning: output.logger=tensorboard, but neither tensorboard nor tensorboardX is installed; "
                "logging the metrics to CSV instead (pip install tensorboard)"
            )
    from lightning.fabric.loggers import CSVLogger

    return CSVLogger(root, name=name, flush_logs_every_n_steps=flush_every)


def format_header() -> str:
    return (
        f"{'image':<28} {'status':<7} {'no-NTI*':>11} {'NTI*':>9} {'NTI vs input':>17} {'inner steps':>11} "
        f"{'s/img':>7}    (* PSNR vs the VAE round trip)"
    )


def format_row(rec: dict) -> str:
    if rec["status"] != "ok":
        return f"{rec['id']:<28} {'failed':<7} {rec.get('error', '')}"
    m = rec["metrics"]
    base = m.get("ddim_no_nti", {}).get("vs_vae", {}).get("psnr", float("nan"))
    return (
        f"{rec['id']:<28} {'ok':<7} {base:>9.2f}dB {m['nti']['vs_vae']['psnr']:>7.2f}dB "
        f"{m['nti']['vs_input']['psnr']:>15.2f}dB {m['inner_steps']:>11} {rec['seconds']:>7.1f}"
    )


__all__ = [
    "run_inversion",
    "read_manifest",
    "RunSummary",
    "OutputMismatchError",
    "CaptionError",
    "EXIT_PREEMPTED",
]
