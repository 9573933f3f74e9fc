"""``nti eval``: every (image, method) pair of a PIE-Bench-format folder inverted, reconstructed, edited, measured.

``run_eval`` is the whole run, top to bottom:

1. **Entries** — ``eval.pie.load_pie`` (one line per bad entry; the run goes on), then this worker's static
   share: entry k → shard k mod S, then rank (k div S) mod world (``run.folder.WorkerId.is_mine``, as ``nti invert``).
2. **The output folder** — ``eval.json`` ties it to the settings (a rerun with others is refused); the pairs
   already in ``per_image.jsonl`` are skipped: a killed run redoes no finished pair.
3. **Model and metric networks** — the model from ``--model``; LPIPS/DINO/CLIP only from local paths.
4. **Per method** — its pending images stream through one ``slots.SlotEngine`` (batched, like ``nti invert``).
   For each finished record: the reconstruction (the record sampled with the source prompt alone), the
   Prompt-to-Prompt edit PIE-Bench runs (below), the metrics, the pictures (atomic writes), then one appended,
   fsynced line in ``per_image.jsonl`` — a pair is done once that line is on disk.
5. **Strips** — source, then reconstruction and edit of each method, for this worker's finished images.
6. **Summary** — ``summary.json``, ``summary.md``, ``psnr_vs_time.png`` from every record on disk (all shards:
   the last worker to finish writes the complete one).

The edit (Ju et al. 2024, ``run_editing_p2p.py``): source and target prompt without ``[ ]``, w = 7.5,
cross-attention injected for the first 40% of the steps and self-attention for 60%; word swap ("replace") when
the prompts have as many words (P2P's rule: a multi-token word maps as a whole), else "refine"; ``blended_word``
"src tgt" → local blend on both words and the target word's attention ×2. Seconds and UNet calls per image count
the inversion and the edit (not the reconstruction, which is this evaluation's, not the method's).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image

from nti_lightning.api import reconstruction_latents
from nti_lightning.config import InversionConfig
from nti_lightning.data.image import prepare_image, tensor_to_image
from nti_lightning.engine.ddim import schedule_from_scheduler
from nti_lightning.engine.runtime import Runtime
from nti_lightning.engine.sampling import ddim_sample, decode_latents
from nti_lightning.engine.slots import Admission, Failed, Finished, SlotEngine
from nti_lightning.engine.step_guidance import record_guidance
from nti_lightning.eval import report
from nti_lightning.eval.config import EvalConfig
from nti_lightning.eval.metrics import Backbones, Nets, load_nets, lpips, pie_metrics, psnr, ssim
from nti_lightning.eval.pie import PieEntry, load_pie, mask_at, pie_border
from nti_lightning.p2p.alignment import AlignmentError, WordNotInPromptError
from nti_lightning.p2p.edit import EditSpec, edit_batch
from nti_lightning.run.folder import WorkerId, identity_diff
from nti_lightning.store.files import atomic_save_image, atomic_write_bytes

Log = Callable[[str], None]


class EvalFolderMismatch(ValueError):
    """The output folder holds results made with other settings."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# 1–2. Entries and the output folder
# ---------------------------------------------------------------------------------------------------------


def my_entries(cfg: EvalConfig, log: Log) -> list[PieEntry]:
    """Step 1: the mapping file's good entries (first ``limit``), this worker's share of them."""
    entries, errors = load_pie(cfg.data)
    for err in errors:
        log(f"skipped: {err}")
    if not entries and errors:
        raise FileNotFoundError(f"no usable entry in {cfg.data}: {errors[0]}")
    entries = entries[: cfg.limit] if cfg.limit else entries
    worker = WorkerId(cfg.shard_index, cfg.num_shards, cfg.rank, cfg.world_size)
    return [e for k, e in enumerate(entries) if worker.is_mine(k)]


def eval_identity(cfg: EvalConfig, model) -> dict:
    """What must not change between runs writing into one folder (the methods may: each pair is its own)."""
    keys = ("num_ddim_steps", "num_inner_steps", "guidance_scale", "cross_replace_steps", "self_replace_steps")
    return {
        "model_fingerprint": model.fingerprint,
        "model_source": model.source,
        "image_size": cfg.image_size or model.native_image_size,
        "blend_reweight": cfg.blend_reweight,
        **{k: getattr(cfg, k) for k in keys},
    }


def claim_folder(out: Path, identity: dict, overwrite: bool) -> None:
    """Step 2: eval.json must match (or ``overwrite`` starts the folder's records over)."""
    path = out / "eval.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != identity and not overwrite:
            diff = ", ".join(identity_diff(old, identity))
            raise EvalFolderMismatch(f"{out} holds an evaluation made with other settings ({diff}); use another "
                                     "--out or pass --overwrite")  # fmt: skip
        if old != identity:
            (out / report.PER_IMAGE).unlink(missing_ok=True)
    atomic_write_bytes(path, json.dumps(identity, indent=2, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------------------
# 4. One pair: edit spec, measurements, record
# ---------------------------------------------------------------------------------------------------------


def edit_spec(entry: PieEntry, cfg: EvalConfig, plain: bool = False) -> EditSpec:
    """PIE-Bench's P2P edit of ``entry``; ``plain``: refine without local blend or re-weighting (the fallback
    when the entry's words cannot be found or aligned)."""
    words = entry.blended_words if len(entry.blended_words) == 2 and not plain else ()
    return EditSpec(
        entry.target_prompt,
        mode=None if not plain else "refine",  # None: P2P's rule, replace when the prompts align word for word
        cross_replace_steps=cfg.cross_replace_steps,
        self_replace_steps=cfg.self_replace_steps,
        blend_words=list(words) or None,
        reweight={words[1]: cfg.blend_reweight} if words else None,
    )


def run_edit(model, inv, entry: PieEntry, cfg: EvalConfig, log: Log) -> tuple[torch.Tensor, str, str | None]:
    """The P2P edit → (latents [source, target], mode, fallback reason). If the entry's words do not fit the
    prompts: refine without local blend; if even that cannot align them (a deletion: the target lacks source
    words), the target prompt sampled from the record without attention control (mode "none")."""
    try:
        result = edit_batch(model, inv, [edit_spec(entry, cfg)])
        return result.latents, result.modes[0], None
    except (AlignmentError, WordNotInPromptError) as e:
        reason = str(e)
    try:
        result = edit_batch(model, inv, [edit_spec(entry, cfg, plain=True)])
        log(f"{entry.entry_id}: {reason}; edited with refine, no local blend")
        return result.latents, result.modes[0], reason
    except AlignmentError:
        log(f"{entry.entry_id}: {reason}; no P2P alignment: the target prompt sampled without attention control")
        return uncontrolled_edit(model, inv, entry.target_prompt), "none", reason


def uncontrolled_edit(model, inv, target: str) -> torch.Tensor:
    """[source, target] sampled from the record with its nulls and step guidance, no attention control."""
    schedule = schedule_from_scheduler(model.scheduler, inv.num_steps)
    z_T = inv.z_T[None].expand(2, -1, -1, -1).to(model.device)
    cond = inv.sized_family(model).encode_prompts(model, [inv.prompt, target])
    nulls = [{k: v.expand(2, *v.shape[1:]) for k, v in null.items()} for null in inv.nulls(model)]
    w = inv.meta["hyperparameters"]["guidance_scale"]
    denoise = Runtime().denoiser(model.unet, model.family)
    return ddim_sample(denoise, schedule, z_T, cond, nulls, w, None, record_guidance([inv], 2, edit=True)).cpu()


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) in [-1, 1] → (1, 3, H, W) in [0, 1]."""
    return ((pixels.float().cpu() + 1) / 2).clamp(0, 1).reshape(1, *pixels.shape[-3:])


def measure(source: torch.Tensor, recon: torch.Tensor, edited: torch.Tensor, entry: PieEntry, nets: Nets) -> dict:
    """Reconstruction PSNR/SSIM/LPIPS against the source; PIE-Bench's Table 1 metrics of the edit."""
    out = {"psnr_rec": float(psnr(recon, source)[0]), "ssim_rec": float(ssim(recon, source)[0])}
    if nets.lpips is not None:
        out["lpips_rec"] = float(lpips(recon, source, nets.lpips)[0])
    mask = mask_at(pie_border(entry.mask), tuple(source.shape[-2:])).numpy()
    out.update(pie_metrics(source, edited, mask, entry.target_prompt, nets))
    return out


def finish_pair(ctx: dict, entry: PieEntry, method: str, inv, seconds_invert: float) -> dict:
    """Step 4 for one finished record: reconstruct, edit, measure, save pictures, append the record."""
    model, cfg, out, log = ctx["model"], ctx["cfg"], ctx["out"], ctx["log"]
    recon = to_unit(decode_latents(model, reconstruction_latents(model, [inv]))[0])
    t0 = time.perf_counter()
    latents, mode, fallback = run_edit(model, inv, entry, cfg, log)
    seconds_edit = time.perf_counter() - t0
    edited = to_unit(decode_latents(model, latents[1:2].to(model.device))[0])
    source = ctx["sources"][entry.entry_id]
    rec = {"id": entry.entry_id, "method": method, "editing_type_id": entry.editing_type_id}
    rec.update(measure(source, recon, edited, entry, ctx["nets"]))
    calls_invert = int(sum(inv.meta["unet_calls"].values()))
    calls_edit = cfg.num_ddim_steps * 2 * 2  # T steps × [source, target] × [∅, C]
    rec.update(
        mode=mode, seconds=seconds_invert + seconds_edit, seconds_invert=seconds_invert,
        seconds_edit=seconds_edit, unet_calls=calls_invert + calls_edit, unet_calls_invert=calls_invert,
        worker=cfg.worker,
    )  # fmt: skip
    if fallback is not None:
        rec["edit_fallback"] = fallback
    folder = out / "images" / entry.entry_id
    atomic_save_image(folder / f"{method}_recon.png", tensor_to_image(recon[0] * 2 - 1))
    atomic_save_image(folder / f"{method}_edit.png", tensor_to_image(edited[0] * 2 - 1))
    report.append_record(out, rec)  # last: the pair is done once this line is on disk
    log(f"{entry.entry_id} {method}: recon PSNR {rec['psnr_rec']:.2f} dB, background PSNR {rec['psnr_bg']:.2f} dB, "
        f"{rec['seconds']:.1f} s, {rec['unet_calls']} UNet calls")  # fmt: skip
    return rec


# ---------------------------------------------------------------------------------------------------------
# 4. One method over its pending images, through the slot engine
# ---------------------------------------------------------------------------------------------------------


def run_method(ctx: dict, method: str, pending: list[PieEntry]) -> int:
    """Streams ``pending`` through one SlotEngine running ``method``; returns the pairs finished."""
    model, cfg, log = ctx["model"], ctx["cfg"], ctx["log"]
    icfg = InversionConfig(method=method, num_ddim_steps=cfg.num_ddim_steps, num_inner_steps=cfg.num_inner_steps,
                           guidance_scale=cfg.guidance_scale, image_size=cfg.image_size, batch_size=cfg.batch_size,
                           lr_decay_horizon=max(100, cfg.num_ddim_steps))  # fmt: skip
    engine = SlotEngine(model, icfg, cfg.batch_size, image_size=ctx["size"])
    by_id = {e.entry_id: e for e in pending}
    started: dict[str, float] = {}

    def admissions() -> Iterator[Admission]:
        for e in pending:
            started[e.entry_id] = time.perf_counter()
            yield Admission(e.entry_id, ctx["pixels"][e.entry_id], e.source_prompt)

    done = 0
    for event in engine.run(admissions()):
        if isinstance(event, Failed):
            ctx["failed"].append((event.tag, method))
            log(f"{event.tag} {method}: failed ({event.error}); it is retried on a rerun")
        elif isinstance(event, Finished):
            try:
                finish_pair(ctx, by_id[event.tag], method, event.inversion, time.perf_counter() - started[event.tag])
                done += 1
            except Exception as e:  # noqa: BLE001 — one pair's failure must not stop the others
                ctx["failed"].append((event.tag, method))
                log(f"{event.tag} {method}: failed ({type(e).__name__}: {e}); it is retried on a rerun")
    return done


# ---------------------------------------------------------------------------------------------------------
# 5. Strips
# ---------------------------------------------------------------------------------------------------------


def write_strips(out: Path, entries: list[PieEntry], methods: list[str], sources: dict) -> int:
    """strips/<id>.png for each entry whose every method is done (pictures read back from images/<id>/)."""
    done, n = report.finished(out), 0
    for e in entries:
        if not all((e.entry_id, m) in done for m in methods):
            continue
        folder = out / "images" / e.entry_id
        pairs = {}
        for m in methods:
            with Image.open(folder / f"{m}_recon.png") as r, Image.open(folder / f"{m}_edit.png") as ed:
                pairs[m] = (r.convert("RGB"), ed.convert("RGB"))
        source = tensor_to_image(sources[e.entry_id][0] * 2 - 1)
        report.image_strip(source, pairs, out / "strips" / f"{e.entry_id}.png", size=max(source.width, 128))
        n += 1
    return n


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


class _ToLog(logging.Handler):
    def __init__(self, log: Log) -> None:
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log(record.getMessage())


def run_eval(cfg: EvalConfig, overwrite: bool = False, log: Log = _stderr) -> dict:
    """Steps 1–6 (module docstring). → {"done": pairs finished now, "skipped": done before, "failed", "summary"}."""
    from nti_lightning.models import load_model

    handler = _ToLog(log)
    logging.getLogger("nti_lightning.eval").addHandler(handler)
    logging.getLogger("nti_lightning.eval").setLevel(logging.INFO)
    try:
        out = Path(cfg.out)
        entries = my_entries(cfg, log)  # 1
        device = cfg.device or (f"cuda:{_local_rank()}" if torch.cuda.is_available() else "cpu")
        # 3 (the identity needs the model's fingerprint)
        model = load_model(cfg.model, device=device, config_dir=cfg.config_dir)
        claim_folder(out, eval_identity(cfg, model), overwrite)  # 2
        finished = report.finished(out)
        todo = {m: [e for e in entries if (e.entry_id, m) not in finished] for m in cfg.methods}
        skipped = len(entries) * len(cfg.methods) - sum(len(v) for v in todo.values())
        log(f"{cfg.worker}: {len(entries)} image(s) × {len(cfg.methods)} method(s) on {device}; "
            f"{skipped} pair(s) already done, {sum(len(v) for v in todo.values())} to do → {out}")  # fmt: skip
        nets = load_nets(Backbones(*(Path(p) if p else None for p in (cfg.lpips, cfg.dino, cfg.clip))))
        size = cfg.image_size or model.native_image_size
        pixels = {e.entry_id: prepare_image(e.image_file, size, name=str(e.image_file)) for e in entries}
        ctx = {"model": model, "cfg": cfg, "out": out, "log": log, "nets": nets, "size": size, "pixels": pixels,
               "sources": {k: to_unit(v) for k, v in pixels.items()}, "failed": []}  # fmt: skip
        done = sum(run_method(ctx, m, todo[m]) for m in cfg.methods if todo[m])  # 4
        if cfg.strips:
            log(f"{write_strips(out, entries, cfg.methods, ctx['sources'])} strip(s) → {out / 'strips'}")  # 5
        summary = report.write_summary(out)  # 6
        log(f"summary of {len(report.read_records(out))} record(s) → {out / 'summary.md'}")
        return {"done": done, "skipped": skipped, "failed": ctx["failed"], "summary": summary}
    finally:
        logging.getLogger("nti_lightning.eval").removeHandler(handler)


def _local_rank() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


__all__ = ["EvalConfig", "run_eval"]
