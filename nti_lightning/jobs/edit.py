"""``nti edit OUTPUT --edits FILE``: every line of FILE edits an image of the ``nti invert`` run in OUTPUT.

A job on the run layer, in ``run_job``'s frame (``run.job``), with its own folder ``OUTPUT/edits``
(``output.folder``): its claim, ``run.json``, ``config.yaml``, records, logs and pictures.

1. **Check** that OUTPUT is a folder and FILE a file.
2. **Claim** the job folder (every rank) and compare its ``run.json`` (rank 0: a folder of this job); with
   ``edit.overwrite`` the job's records start over.
3. **Start**: Fabric's runtime (device, ``trainer.precision``); rank 0 commits the identity and ``config.yaml``.
   The model is loaded with the first inversion (the record's own, or ``model.spec``).
4. **Lines**: this worker's share (line k, 0-based → ``WorkerId.is_mine(k)``), minus the lines whose record
   (id: line number + a hash of the line's content) is done with the same settings; streamed, ``CHUNK`` at a time.
5. **Loop**, per chunk: each line resolves (``p2p.edit_file.resolve_line``: an ``image_id`` is looked up among the
   run's finished images, an ``inversion`` path must lie inside OUTPUT) or is recorded as failed with the reason;
   the others are grouped by inversion and guidance scale and sampled ``edit.batch_size`` per pass. Each edit's
   files go to ``images/<image id component>/<line>_<target slug>.*`` (fixed names: a rerun rewrites them, never a
   ``-2``), atomically, then its record — a kill loses at most the lines of the pass in progress. A stop signal
   ends the loop between passes (exit 75; rerun to resume).
6. **Results**: ``results.jsonl`` (``output.results``): every line of FILE with its latest record from every
   worker, or ``"pending"``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from nti_lightning.config import config_to_yaml
from nti_lightning.data.ids import UnsafeIdError, check_id
from nti_lightning.engine.runtime import Runtime
from nti_lightning.jobs.edit_config import EditRunConfig
from nti_lightning.jobs.paths import absolute, absolute_model
from nti_lightning.p2p import cli as p2p_cli
from nti_lightning.p2p.edit import build_controller
from nti_lightning.p2p.edit_file import Line, read_edit_lines, recorded_inversions, resolve_line
from nti_lightning.p2p.figures import input_image
from nti_lightning.p2p.outputs import edit_files, settings_record, slug, write_edit
from nti_lightning.run.folder import WorkerId
from nti_lightning.run.job import JobWorker, run_job, summary_path
from nti_lightning.run.launch import Placement, launch, make_fabric
from nti_lightning.run.progress import progress_bar
from nti_lightning.run.signals import Preempted, StopFlag
from nti_lightning.store.files import atomic_write, inside, item_relpath
from nti_lightning.store.records import FAILED, OK, RunIndex, dumps, short_hash
from nti_lightning.text import check_prompt

CHUNK = 4096
"""Lines resolved and grouped at a time: memory stays bounded whatever the file's length."""
NOT_SETTINGS = ("batch_size", "overwrite")
"""Edit settings that do not change an edit's result (a line done with another value is not redone)."""


def output_id(inv, inv_path) -> str:
    """The image id a line given by its ``inversion`` path is filed under: the id the record names (``nti
    invert`` writes it into ``meta.image.id``), else the inversion's folder name."""
    image = inv.meta.get("image")
    for candidate in (image.get("id") if isinstance(image, dict) else None, inv_path.parent.name):
        try:
            return check_id(candidate)
        except UnsafeIdError:  # also None: not a string
            continue
    return "inversion"


class EditWorker(JobWorker):
    """The state of one worker's edits; ``run_rank`` is its whole story."""

    def __init__(self, cfg: EditRunConfig, place: Placement, stop: StopFlag, quiet: bool) -> None:
        d = cfg.data
        self.run_dir = Path(cfg.output.dir)
        worker = WorkerId(d.shard_index, d.num_shards, place.rank, place.world)
        super().__init__(inside(self.run_dir, cfg.output.folder), worker, place, stop, quiet, "edit")
        self.cfg, self.model = cfg, None
        self.lookup = recorded_inversions(self.run_dir)
        self.results = Path(cfg.output.results) if cfg.output.results else self.root / "results.jsonl"

    # -- 1–3. check, claim, start --------------------------------------------------------------------------

    def check(self) -> None:
        if not self.run_dir.is_dir():
            raise FileNotFoundError(
                f"{self.run_dir} is not a folder; the batch form (--edits) takes an `nti invert` output folder"
            )
        edits = self.cfg.data.edits
        if not edits or not Path(edits).is_file():
            raise FileNotFoundError(f"edits file {edits} does not exist; fix --edits (data.edits)")
        self.edits = Path(edits)

    def claim_and_start(self) -> None:
        identity = {"job": "edit"}  # what a line's result depends on is in its record's key (``settings_key``)
        overwrite = self.cfg.edit.overwrite
        self.claim(identity, overwrite)
        if self.worker.rank == 0 and overwrite:
            self.folder.start_over()  # --overwrite: every line is redone
        self.fabric = make_fabric(self.cfg, self.place, self.folder.tmp)
        self.runtime = Runtime(self.fabric)
        self.start(identity, config_to_yaml(self.cfg), self.cfg.trainer.ddp_timeout_s)

    # -- 4. lines ------------------------------------------------------------------------------------------

    def settings_key(self, line: Line) -> str:
        """What a line's result depends on beside its content: a line done with other settings is redone."""
        edit = {k: v for k, v in asdict(self.cfg.edit).items() if k not in NOT_SETTINGS}
        model, precision = asdict(self.cfg.model), self.cfg.trainer.precision
        return dumps({"line": line.text, "edit": edit, "model": model, "precision": precision}, sort_keys=True)

    def mine(self):
        """(line, error) of this worker's lines, streamed."""
        for n, text, rec, error in read_edit_lines(self.edits):
            if self.worker.is_mine(n - 1):
                yield Line(n, rec or {}, text), error

    def done(self, line: Line) -> bool:
        e = self.index.get(line.record_id)
        return e is not None and e["status"] == OK and int(e["prompt"]) == short_hash(self.settings_key(line))

    def count_lines(self) -> None:
        self.index = RunIndex.load(self.root)
        total = sum(1 for _ in read_edit_lines(self.edits))
        mine = todo = 0
        for line, _ in self.mine():
            mine += 1
            todo += not self.done(line)
        self.n_todo, self.summary.skipped = todo, mine - todo
        self.folder.write_progress({"total": total, "mine": mine, "todo": todo, "started_at": time.time(),
                                    **asdict(self.worker)})  # fmt: skip

    # -- 5. the loop ---------------------------------------------------------------------------------------

    def record(self, line: Line, status: str, **fields) -> None:
        rec = {"id": line.record_id, "line": line.number, "image_id": line.image_id or None,
               "target": line.record.get("target"), **fields, "status": status}  # fmt: skip
        rec.update(rank=self.worker.rank, finished_at=time.time())
        if self.worker.num_shards > 1:
            rec["shard"] = self.worker.shard
        code = OK if status == "ok" else FAILED
        self.records.append(rec, code, prompt=self.settings_key(line), seconds=float(rec.get("seconds", 0.0)))
        self.summary.add(rec)
        if status == "ok":
            self.note(f"line {line.number}: {rec['mode'] or 'no edit'} → {rec['paths']['edit']}")
        else:
            self.warn(f"{self.edits}:{line.number}: {rec.get('error')}")
        if self.bar is not None:
            self.bar.update(1)

    def between_passes(self) -> None:
        self.folder.check_claims()
        if self.stop.requested:
            raise Preempted(f"signal {self.stop.signum}")

    def loop(self) -> None:
        w = self.worker
        self.note(f"{w.name} of {w.world} rank(s) × {w.num_shards} shard(s): {self.n_todo} line(s) to edit, "
                  f"{self.summary.skipped} already done, into {self.root} on {self.fabric.device}")  # fmt: skip
        show = w.rank == 0 and not self.quiet
        self.bar = progress_bar(self.log, self.n_todo, f"{w.name} editing", show)
        chunk: list[tuple[Line, str | None]] = []
        for line, error in self.mine():
            if not self.done(line):
                chunk.append((line, error))
            if len(chunk) >= CHUNK:
                self.run_chunk(chunk)
                chunk = []
        self.run_chunk(chunk)

    def run_chunk(self, chunk: list[tuple[Line, str | None]]) -> None:
        """Resolves the chunk's lines (the bad ones are recorded as failed), then edits them per image."""
        groups: dict[tuple[Path, float | None], list[Line]] = {}
        for line, error in chunk:
            try:
                if error:
                    raise ValueError(error)
                resolve_line(self.run_dir, line, self.cfg.edit, self.lookup)
            except p2p_cli.EDIT_ERRORS as e:
                self.record(line, "failed", error=str(e))
                continue
            groups.setdefault((line.inversion, line.config.guidance_scale), []).append(line)
        for (inv_path, guidance), lines in groups.items():
            self.edit_image(inv_path, lines, replace(self.cfg.edit, guidance_scale=guidance))

    def load(self, inv_path):
        """The inversion (a file or a recorded image), checked against the job's model (loaded now, at the first
        image)."""
        inv = self.lookup.load(inv_path)
        if self.model is None:
            m = self.cfg.model
            self.model = p2p_cli.load_model_for(inv, m.spec, self.fabric.device, m.config_dir)
        return self.lookup.load(inv_path, self.model)

    def edit_image(self, inv_path: Path, lines: list[Line], config) -> None:
        """Edits ``lines`` of one inversion sharing ``config.guidance_scale``, ``config.batch_size`` per pass. An
        image that cannot be loaded fails all its lines; a line that cannot be applied fails alone."""
        try:
            inv = self.load(inv_path)
        except Exception as e:  # noqa: BLE001 — unreadable file, other model: every edit of this image fails
            for line in lines:
                self.record(line, "failed", error=f"{inv_path.name}: {type(e).__name__}: {e}")
            return
        good = [line for line in lines if self.applies(inv, line)]
        source = input_image(self.model, inv) if good else None
        for start in range(0, len(good), config.batch_size):
            self.between_passes()
            chunk = good[start : start + config.batch_size]
            t0 = time.perf_counter()
            try:
                result = p2p_cli.sample_edits(self.model, inv, [ln.spec for ln in chunk], config, self.runtime)
            except Exception as e:  # noqa: BLE001 — e.g. out of memory: these edits fail, the rest go on
                for line in chunk:
                    self.record(line, "failed", error=f"edit failed: {type(e).__name__}: {e}")
                continue
            seconds = round((time.perf_counter() - t0) / len(chunk), 3)
            for k, line in enumerate(chunk, 1):
                self.write_line(line, inv_path, inv, result, k, source, seconds)

    def applies(self, inv, line: Line) -> bool:
        """The line's target fits the tokenizer and aligns with the source prompt for its mode; else it fails."""
        try:
            check_prompt(self.model.tokenizer, line.spec.target, label="target")
            build_controller(self.model.tokenizer, inv.prompt, [line.spec], inv.num_steps, tuple(inv.z_T.shape[-2:]))
        except p2p_cli.EDIT_ERRORS as e:
            self.record(line, "failed", error=str(e))
            return False
        return True

    def write_line(self, line: Line, inv_path, inv, result, k: int, source, seconds: float) -> None:
        """Edit k of ``result``: its files under the job folder (fixed names), then its record."""
        line.image_id = line.image_id or output_id(inv, inv_path)
        folder = inside(self.root, item_relpath(line.image_id, self.cfg.output.subdirs))
        stem = f"{line.number:04d}_{slug(line.spec.target)}"
        where = inv_path if isinstance(inv_path, Path) else inv_path.where
        settings = settings_record(where, inv, self.model, line.spec, line.config, result, k)
        files = write_edit(edit_files(folder, stem), result, k, source, settings, self.cfg.edit.attention,
                           self.folder.tmp)  # fmt: skip
        paths = {name: str(p.relative_to(self.run_dir)) for name, p in files.items()}
        self.record(line, "ok", mode=result.modes[k - 1], paths=paths, seconds=seconds)

    # -- 6. results ----------------------------------------------------------------------------------------

    def finish(self) -> None:
        """``results.jsonl``: every line of the file with its latest record (every worker's), or pending."""
        from nti_lightning.store.manifest import read_manifest

        recs = read_manifest(self.root)

        def write(f) -> None:
            for n, text, _, _ in read_edit_lines(self.edits):
                rec = recs.get(Line(n, {}, text).record_id) or {"line": n, "status": "pending"}
                f.write((dumps(rec) + "\n").encode("utf-8", "surrogatepass"))

        atomic_write(self.results, write, self.folder.tmp)
        s = self.summary
        self.note(f"{self.worker.name}: {s.n_done} edited, {s.n_failed} failed, {s.skipped} already done → "
                  f"{self.results}")  # fmt: skip


def run_rank(cfg: EditRunConfig, place: Placement, stop: StopFlag, quiet=False):
    """This worker's whole share of the edits (module docstring) → its ``RunSummary``."""
    w = EditWorker(cfg, place, stop, quiet)

    def setup() -> None:
        w.check()  # 1
        w.claim_and_start()  # 2–3

    def work() -> None:
        w.count_lines()  # 4
        w.loop()  # 5

    return run_job(w, setup, work, w.finish)  # 6


def absolute_paths(cfg: EditRunConfig) -> EditRunConfig:
    """The run folder, the edits file, the results file and local model paths made absolute (``config.yaml``
    usable from any folder; every rank sees the same paths)."""

    out = replace(cfg.output, dir=absolute(cfg.output.dir), results=absolute(cfg.output.results))
    data = replace(cfg.data, edits=absolute(cfg.data.edits))
    return replace(cfg, output=out, data=data, model=absolute_model(cfg.model))


def run_edits(cfg: EditRunConfig, *, quiet=False, argv=None):
    """Runs every line of ``cfg.data.edits`` over ``cfg.output.dir`` (``nti edit OUTPUT --edits FILE``) → this
    process's ``RunSummary`` (for the process that started its node's other ranks, the whole run's)."""
    from nti_lightning.engine.runtime import resolve_precision

    cfg = absolute_paths(cfg)
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    if precision != cfg.trainer.precision:  # "auto": record the mode that actually runs
        cfg = replace(cfg, trainer=replace(cfg.trainer, precision=precision))
    d, job = cfg.data, inside(Path(cfg.output.dir), cfg.output.folder)
    paths = lambda r: summary_path(job, WorkerId(d.shard_index, d.num_shards, r, 0))  # noqa: E731
    return launch(run_rank, cfg, argv, paths, quiet=quiet)


__all__ = ["EditWorker", "run_edits", "run_rank"]
