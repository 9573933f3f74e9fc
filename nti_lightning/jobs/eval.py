"""``nti eval``: every (image, method) pair of a PIE-Bench-format folder inverted, reconstructed, edited, measured.

On the run layer, as ``nti invert`` (``jobs.invert``), in ``run_job``'s frame (``run.job``):

1. **Check** the folder's entries (``eval.pie.load_pie``, each id checked: one line per bad entry, the run goes
   on) and this worker's static share: entry k → array task k mod S, then rank (k div S) mod world
   (``run.folder.WorkerId.is_mine``).
2. **Claim** the output folder (every rank) and compare its ``run.json`` (rank 0) — before the model loads.
3. **Build** the model, Fabric's runtime (device and ``trainer.precision``), the batch size ("auto" as invert),
   the metric networks; rank 0 commits the identity and ``config.yaml``, the other ranks wait for it.
4. **Pairs**: this worker's (image, method) pairs minus those the record index holds as done with the same
   entry (a changed entry is redone); failed pairs are retried.
5. **Loop**, per method: its pending images stream through one ``SlotEngine`` (decoded as they are admitted,
   a few ahead: only the images in flight are held); each finished inversion is reconstructed, edited and
   measured (``jobs.eval_pairs``), its pictures written atomically, then its record appended to this worker's
   ``RecordLog`` — a pair is done once its index entry is on disk, so a kill loses at most the pairs in flight.
   A stop signal ends the loop after the current UNet call (exit 75; rerun to resume).
6. **Summary**: strips of this worker's finished images; ``summary.json``, ``summary.md``, ``per_image.jsonl``,
   ``psnr_vs_time.png`` from every worker's records (the last worker to finish writes the complete one).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from nti_lightning.config import config_to_yaml, resolve_batch_size
from nti_lightning.data.ids import UnsafeIdError, check_id
from nti_lightning.engine.runtime import Runtime
from nti_lightning.engine.slots import Admission, Failed, SlotEngine, Tick
from nti_lightning.eval import report
from nti_lightning.eval.config import EvalConfig
from nti_lightning.eval.metrics import Backbones, load_nets
from nti_lightning.eval.pie import load_pie
from nti_lightning.jobs.eval_pairs import decode_entry, entry_fingerprint, evaluate_pair, write_strip
from nti_lightning.jobs.invert_items import prefetched
from nti_lightning.jobs.paths import absolute, absolute_model
from nti_lightning.run.folder import OutputMismatchError, WorkerId
from nti_lightning.run.job import JobWorker, run_job, summary_path
from nti_lightning.run.launch import Placement, launch, make_fabric
from nti_lightning.run.progress import progress_bar
from nti_lightning.run.signals import Preempted, StopFlag
from nti_lightning.store.records import FAILED, OK, RunIndex, short_hash
from nti_lightning.text import PromptError, check_prompt

NOT_IDENTITY = ("method", "batch_size", "slots", "batch_invariant")
"""Inversion settings that are not part of the folder's identity (each pair names its method; the others change
speed, not results)."""
PRE_LOAD_UNKNOWN = ("model_fingerprint", "model_config_dir", "image_size", "inversion.image_size")
"""Identity keys only the loaded model can tell: compared after the load."""


def eval_identity(cfg: EvalConfig, model=None) -> dict:
    """What must not change between runs writing into one folder (the methods may: each pair is its own);
    ``model`` None: the part known before the load."""
    from nti_lightning.models.loading import model_source

    inversion = {k: v for k, v in asdict(cfg.inversion).items() if k not in NOT_IDENTITY}
    size = (cfg.inversion.image_size or model.native_image_size) if model is not None else cfg.inversion.image_size
    inversion["image_size"] = size
    return {
        "job": "eval",
        "model_fingerprint": model.fingerprint if model is not None else None,
        "model_source": model.source if model is not None else model_source(cfg.model.spec),
        **({"model_config_dir": model.config_dir} if model is not None and model.config_dir else {}),
        "model_dtype": cfg.model.dtype,
        "inversion": inversion,
        "image_size": size,
        "edit": asdict(cfg.edit),
        "precision": cfg.trainer.precision,
    }


class _ToLog(logging.Handler):
    """The metric modules' lines (``nti_lightning.eval``: "LPIPS skipped …") into the worker's log."""

    def __init__(self, note) -> None:
        super().__init__(logging.INFO)
        self.note = note

    def emit(self, record: logging.LogRecord) -> None:
        self.note(record.getMessage())


class EvalWorker(JobWorker):
    """The state of one worker's evaluation; ``run_rank`` is its whole story."""

    def __init__(self, cfg: EvalConfig, place: Placement, stop: StopFlag, quiet: bool) -> None:
        d = cfg.data
        worker = WorkerId(d.shard_index, d.num_shards, place.rank, place.world)
        super().__init__(Path(cfg.output.dir), worker, place, stop, quiet, ",".join(cfg.methods))
        self.cfg, self.out = cfg, self.root
        self.inflight: dict[str, tuple] = {}  # pair id → (entry, pixels): the images in the engine
        handler, metrics_log = _ToLog(self.note), logging.getLogger("nti_lightning.eval")
        metrics_log.addHandler(handler)
        metrics_log.setLevel(logging.INFO)
        self.closing.append(lambda: metrics_log.removeHandler(handler))

    # -- 1–2. check and claim ------------------------------------------------------------------------------

    def check(self) -> None:
        data, out = Path(self.cfg.data.dir), self.out
        if not (data / "mapping_file.json").is_file():
            raise FileNotFoundError(f"{data} holds no mapping_file.json; give a PIE-Bench-format folder (DIR)")
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"output folder {out} is a file; give a folder (--out / output.dir)")
        entries, errors = load_pie(data)
        for err in errors:
            self.warn(f"skipped: {err}")
        good = []
        for e in entries:
            try:
                check_id(e.entry_id, str(data / "mapping_file.json"))
            except UnsafeIdError as x:
                self.warn(f"skipped: {x}")
                continue
            good.append(e)
        if not good:
            raise FileNotFoundError(f"no usable entry in {data}: {errors[0] if errors else 'it is empty'}")
        limited = good[: self.cfg.data.limit] if self.cfg.data.limit else good
        self.n_entries = len(limited)
        self.entries = [e for k, e in enumerate(limited) if self.worker.is_mine(k)]

    def claim_folder(self, overwrite: bool) -> None:
        self.claim(eval_identity(self.cfg), overwrite, unknown=PRE_LOAD_UNKNOWN)
        old = [self.out / "eval.json", self.out / report.PER_IMAGE]
        if self.worker.rank == 0 and old[0].is_file() and not self.folder.identity_path.is_file():
            if not overwrite:
                raise OutputMismatchError(
                    f"{self.out} was evaluated by an older nti eval (eval.json); use another --out, or pass "
                    "--overwrite to start it over"
                )
            for p in old:
                p.unlink(missing_ok=True)

    # -- 3. model, runtime, networks -----------------------------------------------------------------------

    def build(self, load_model) -> None:
        cfg = self.cfg
        self.fabric = make_fabric(cfg, self.place, self.folder.tmp)
        m = cfg.model
        self.model = load_model(m.spec, device=self.fabric.device, dtype=m.dtype, config_dir=m.config_dir)
        if m.compile != "none":
            self.model.unet = torch.compile(self.model.unet, mode=m.compile)
        self.runtime = Runtime(self.fabric)
        self.size = cfg.inversion.image_size or self.model.native_image_size
        nets = cfg.metrics
        self.nets = load_nets(Backbones(*(Path(p) if p else None for p in (nets.lpips, nets.dino, nets.clip))))
        rows = cfg.inversion.batch_size
        if rows == "auto":
            from nti_lightning.engine.batch_probe import probe_batch_size

            icfg = replace(cfg.inversion, method="nti")  # the method with the largest calls
            on_gpu = self.model.device.type == "cuda"
            rows = probe_batch_size(self.model, icfg, self.runtime, self.size) if on_gpu else resolve_batch_size(rows)
            self.note(f"inversion.batch_size=auto → {rows} rows per UNet call on {self.model.device}")
        self.rows = int(rows)
        self.cfg = replace(cfg, inversion=replace(cfg.inversion, batch_size=self.rows))
        self.identity = eval_identity(self.cfg, self.model)

    # -- 4. pairs ------------------------------------------------------------------------------------------

    def done(self, entry, method: str) -> bool:
        e = self.index.get(report.pair_id(entry.entry_id, method))
        return e is not None and e["status"] == OK and int(e["prompt"]) == short_hash(entry_fingerprint(entry))

    def count_pairs(self) -> None:
        self.index = RunIndex.load(self.out)
        methods = self.cfg.methods
        self.todo = {m: [e for e in self.entries if not self.done(e, m)] for m in methods}
        mine, self.n_todo = len(self.entries) * len(methods), sum(len(v) for v in self.todo.values())
        self.summary.skipped = mine - self.n_todo
        self.folder.write_progress({"total": self.n_entries * len(methods), "mine": mine, "todo": self.n_todo,
                                    "started_at": time.time(), **asdict(self.worker)})  # fmt: skip

    # -- 5. the loop ---------------------------------------------------------------------------------------

    def record(self, entry, method: str, status: str, **fields) -> None:
        rec = {"id": report.pair_id(entry.entry_id, method), "image_id": entry.entry_id, "method": method, **fields}
        rec.update(status=status, rank=self.worker.rank, finished_at=time.time())
        if self.worker.num_shards > 1:
            rec["shard"] = self.worker.shard
        code = OK if status == "ok" else FAILED
        self.records.append(rec, code, prompt=entry_fingerprint(entry), seconds=float(rec.get("seconds", 0.0)))
        self.summary.add(rec)
        if status == "ok":
            self.note(f"{entry.entry_id} {method}: recon PSNR {rec['psnr_rec']:.2f} dB, background PSNR "
                      f"{rec['psnr_bg']:.2f} dB, {rec['seconds']:.1f} s, {rec['unet_calls']} UNet calls")  # fmt: skip
        else:
            self.warn(f"{entry.entry_id} {method}: failed ({rec.get('error')}); a rerun retries it")
        if self.bar is not None:
            self.bar.update(1)

    def admissions(self, method: str):
        """The engine's input: this method's pending images, decoded a few ahead in a thread; a bad image or
        prompt is recorded as failed on the way."""
        lookahead = self.cfg.output.prefetch * self.rows
        pending = enumerate(self.todo[method])
        for _, entry, px in prefetched(pending, lambda e: _decoded(e, self.size), lookahead):
            try:
                if isinstance(px, Exception):
                    raise px
                check_prompt(self.model.tokenizer, entry.source_prompt, label=f"entry {entry.entry_id}")
            except (ValueError, OSError, PromptError) as e:
                self.record(entry, method, "failed", error=str(e))
                continue
            tag = report.pair_id(entry.entry_id, method)
            self.inflight[tag] = (entry, px)
            yield Admission(tag, px, entry.source_prompt)

    def on_event(self, method: str, event) -> None:
        if isinstance(event, Tick):
            self.folder.check_claims()
            if self.stop.requested:
                raise Preempted(f"signal {self.stop.signum} after UNet call {event.number}")
            return
        entry, px = self.inflight.pop(event.tag)
        if isinstance(event, Failed):
            self.record(entry, method, "failed", error=event.error)
            return
        try:
            fields = evaluate_pair(self, entry, method, event.inversion, px, event.seconds)
        except Exception as e:  # noqa: BLE001 — one pair's failure must not stop the others
            self.record(entry, method, "failed", error=f"{type(e).__name__}: {e}")
            return
        self.record(entry, method, "ok", **fields)

    def loop(self) -> None:
        w, c = self.worker, self.cfg
        self.note(
            f"{w.name} of {w.world} rank(s) × {w.num_shards} shard(s): {len(self.entries)} image(s) × "
            f"{len(c.methods)} method(s), {self.n_todo} pair(s) to do, {self.summary.skipped} already done, into "
            f"{self.out} on {self.fabric.device} at {self.size}px, precision {self.runtime.precision}, "
            f"T={c.inversion.num_ddim_steps}, N={c.inversion.num_inner_steps}, {self.rows} rows per UNet call"
        )
        show = w.rank == 0 and c.output.progress_bar and not self.quiet
        self.bar = progress_bar(self.log, self.n_todo, f"{w.name} evaluating", show)
        for method in c.methods:
            if self.todo[method]:
                icfg = replace(c.inversion, method=method)
                pad = c.model.compile != "none"
                engine = SlotEngine(self.model, icfg, self.rows, self.runtime, icfg.slots, pad, self.size)
                for event in engine.run(self.admissions(method)):
                    self.on_event(method, event)

    # -- 6. strips and summary -----------------------------------------------------------------------------

    def finish(self) -> None:
        self.index = RunIndex.load(self.out)
        if self.cfg.output.strips and not (self.summary.preempted or self.summary.interrupted):
            n = 0
            for e in self.entries:
                if all(self.done(e, m) for m in self.cfg.methods):
                    try:
                        write_strip(self.out, e, self.cfg.methods, self.size, self.folder.tmp)
                        n += 1
                    except (OSError, ValueError) as x:  # a picture deleted by hand: its strip is left out
                        self.warn(f"strip of {e.entry_id} skipped: {x}")
            self.note(f"{n} strip(s) → {self.out / 'strips'}")
        records = report.read_records(self.out)
        report.write_summary(self.out, records, self.folder.tmp, self.cfg.methods)
        s = self.summary
        self.note(f"{self.worker.name}: {s.n_done} pair(s) evaluated, {s.n_failed} failed, {s.skipped} already done; "
                  f"summary of {len(records)} record(s) → {self.out / 'summary.md'}")  # fmt: skip


def _decoded(entry, size: int):
    try:
        return decode_entry(entry, size)
    except (ValueError, OSError) as e:
        return e


def run_rank(cfg: EvalConfig, place: Placement, stop: StopFlag, overwrite=False, quiet=False, load_model=None):
    """This worker's whole evaluation (module docstring) → its ``RunSummary``."""
    if load_model is None:
        from nti_lightning.models import load_model
    w = EvalWorker(cfg, place, stop, quiet)

    def setup() -> None:
        w.check()  # 1
        w.claim_folder(overwrite)  # 2
        w.build(load_model)  # 3
        w.start(w.identity, config_to_yaml(w.cfg), cfg.trainer.ddp_timeout_s)

    def work() -> None:
        w.count_pairs()  # 4
        w.loop()  # 5

    return run_job(w, setup, work, w.finish)  # 6


def absolute_paths(cfg: EvalConfig) -> EvalConfig:
    """Data, output, metric networks and a local model path made absolute: ``config.yaml`` is then usable from any
    folder, and every rank sees the same paths whatever its working directory."""

    metrics = {k: absolute(v) for k, v in asdict(cfg.metrics).items()}
    return replace(
        cfg,
        data=replace(cfg.data, dir=absolute(cfg.data.dir)),
        output=replace(cfg.output, dir=absolute(cfg.output.dir)),
        metrics=replace(cfg.metrics, **metrics),
        model=absolute_model(cfg.model),
    )


def run_eval(cfg: EvalConfig, *, overwrite=False, quiet=False, argv=None, load_model=None):
    """Evaluates every pair of ``cfg`` into ``cfg.output.dir`` (``nti eval``) → this process's ``RunSummary`` (for
    the process that started the other ranks of its node, the whole run's). ``argv``: the command line the other
    ranks run (``trainer.devices`` > 1 without srun/torchrun)."""
    from nti_lightning.engine.runtime import resolve_precision

    cfg = absolute_paths(cfg)
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    if precision != cfg.trainer.precision:  # "auto": record the mode that actually runs
        cfg = replace(cfg, trainer=replace(cfg.trainer, precision=precision))
    d, out = cfg.data, Path(cfg.output.dir)
    paths = lambda r: summary_path(out, WorkerId(d.shard_index, d.num_shards, r, 0))  # noqa: E731
    return launch(run_rank, cfg, argv, paths, overwrite=overwrite, quiet=quiet, load_model=load_model)


__all__ = ["EvalConfig", "run_eval", "run_rank"]
