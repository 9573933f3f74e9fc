"""The dataset run behind ``nti invert``: every image inverted once, results and failures in a manifest.

Written once, top to bottom: (1) output folder and its identity, (2) Fabric launch, (3) model,
(4) items of this rank minus those already done, (5) batches: load → invert → reconstruct → metrics → save,
(6) summary. A bad image or caption is recorded as failed with a message that names the file and the fix,
and the run goes on; nothing already written is lost (every write is temp file + rename, the manifest is
append-only).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nti_lightning.api import ddim_baseline_latents, image_size_for, invert_batch, reconstruction_latents
from nti_lightning.config import RunConfig, config_to_yaml
from nti_lightning.dataset import SAMPLES_DIR, CaptionError, Item, iter_items, read_captions
from nti_lightning.engine import decode_latents
from nti_lightning.image import ImageError, prepare_image, tensor_to_image
from nti_lightning.inversion import save_inversion
from nti_lightning.metrics import image_metrics, latent_mse_value, make_strip
from nti_lightning.runtime import Runtime
from nti_lightning.text import PromptError, check_prompt


class OutputMismatchError(RuntimeError):
    """The output folder holds results of a different model or hyperparameters."""


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_image(path: Path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def manifest_name(rank: int, world_size: int) -> str:
    return "manifest.jsonl" if world_size == 1 else f"manifest.rank{rank}.jsonl"


def append_manifest(path: Path, record: dict) -> None:
    """One JSON line, appended and fsynced: a crash leaves at most one partial last line (skipped on read)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_manifest(out_dir: str | os.PathLike) -> dict[str, dict]:
    """All manifest*.jsonl lines of a run, merged; the latest record of an id wins."""
    records: dict[str, dict] = {}
    for p in sorted(Path(out_dir).glob("manifest*.jsonl")):
        with open(p, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                prev = records.get(rec.get("id"))
                if prev is None or rec.get("finished_at", 0) >= prev.get("finished_at", 0):
                    records[rec["id"]] = rec
    return records


def item_dir(out_dir: Path, item_id: str) -> Path:
    return out_dir / item_id


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    output: Path
    done: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    skipped: int = 0


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
    atomic_write_bytes(path, json.dumps(identity, indent=2, sort_keys=True).encode())


def resolve_inputs(cfg: RunConfig) -> tuple[list[str], str | None]:
    if cfg.data.images:
        return list(cfg.data.images), cfg.data.captions
    return [str(SAMPLES_DIR)], cfg.data.captions or str(SAMPLES_DIR / "captions.jsonl")


def make_fabric(cfg: RunConfig):
    import lightning as L

    fabric = L.Fabric(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
    )
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
    """Inverts every image of ``cfg.data`` into ``cfg.output.dir``; returns this rank's summary."""
    from nti_lightning.models import load_model

    out_dir = Path(cfg.output.dir)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    # 1. Launch (one process per device) and load the frozen model on this rank's device
    fabric = fabric or make_fabric(cfg)
    rank, world = fabric.global_rank, fabric.world_size
    model = load_model(cfg.model.spec, device=fabric.device, dtype=cfg.model.dtype)
    runtime = Runtime(fabric)
    size = image_size_for(model, cfg.inversion)

    # 2. Output folder: refuse results of other settings; record the resolved config
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        check_output_identity(out_dir, run_identity(cfg, model), overwrite)
        atomic_write_bytes(out_dir / "config.yaml", config_to_yaml(cfg).encode())
    fabric.barrier()
    if rank != 0:
        check_output_identity(out_dir, run_identity(cfg, model), overwrite=False)
    manifest = out_dir / manifest_name(rank, world)
    previous = read_manifest(out_dir)

    # 3. Items: captions, this rank's static shard, minus what is already done
    images, captions_path = resolve_inputs(cfg)
    captions, warnings = read_captions(captions_path) if captions_path else (None, [])
    for w in warnings:
        log(f"warning: {w}")
    summary = RunSummary(out_dir)

    def record(item: Item, status: str, **fields) -> dict:
        rec = {"id": item.id, "source": item.path, "prompt": item.prompt, "status": status, "rank": rank}
        rec.update(fields, finished_at=time.time())
        append_manifest(manifest, rec)
        (summary.done if status == "ok" else summary.failed).append(rec)
        if status != "ok":
            log(f"failed {item.id}: {rec.get('error')}")
        return rec

    def todo() -> Iterator[Item]:
        for k, item in enumerate(iter_items(images, captions, cfg.data.default_prompt)):
            if k % world != rank:
                continue
            prev = previous.get(item.id)
            if prev is not None and (prev["status"] == "ok" or not retry_failed):
                if prev["status"] != "ok" or (out_dir / prev["paths"]["inversion"]).is_file():
                    summary.skipped += 1
                    continue
            yield item

    # 4. Batches of loadable images
    def process(batch: list[tuple[Item, torch.Tensor]]) -> None:
        items = [it for it, _ in batch]
        pixels = torch.stack([px for _, px in batch])  # (B, 3, H, W)
        t0 = time.perf_counter()
        try:
            results, _ = invert_batch(model, pixels, [it.prompt for it in items], cfg.inversion, runtime)
        except Exception as e:  # e.g. out of memory: record, go on with the next batch
            for it in items:
                record(it, "failed", error=f"inversion failed: {type(e).__name__}: {e}")
            return
        ok = [(it, px, inv) for it, px, inv in zip(items, pixels, results) if inv is not None]
        for it, inv in zip(items, results):
            if inv is None:
                record(it, "failed", error="non-finite loss or latent during null-text optimisation; not saved")
        if not ok:
            return
        invs = [inv for _, _, inv in ok]
        nti_lat = reconstruction_latents(model, invs, runtime=runtime)  # (n, 4, h, w)
        z0 = torch.stack([inv.pivot_z0 for inv in invs]).to(nti_lat.device)
        nti_img = decode_latents(model, nti_lat).cpu()
        vae_img = decode_latents(model, z0).cpu()
        if cfg.output.compute_baseline:
            base_lat = ddim_baseline_latents(model, invs, cfg.inversion.guidance_scale, runtime)
            base_img = decode_latents(model, base_lat).cpu()
        seconds = (time.perf_counter() - t0) / len(items)
        for k, (it, px, inv) in enumerate(ok):
            d = item_dir(out_dir, it.id)
            inv.meta.update(image={"id": it.id, "source": it.path})
            save_inversion(d / "inversion.safetensors", inv)
            metrics = {
                "nti": {"vs_input": image_metrics(nti_img[k], px), "vs_vae": image_metrics(nti_img[k], vae_img[k])},
                "vae_roundtrip_vs_input": image_metrics(vae_img[k], px),
                "nti_latent_mse": latent_mse_value(nti_lat[k], z0[k]),
                "inner_steps": int(inv.inner_steps.sum()),
            }
            pictures = [tensor_to_image(px), tensor_to_image(nti_img[k])]
            if cfg.output.compute_baseline:
                metrics["ddim_no_nti"] = {
                    "vs_input": image_metrics(base_img[k], px),
                    "vs_vae": image_metrics(base_img[k], vae_img[k]),
                }
                metrics["ddim_no_nti_latent_mse"] = latent_mse_value(base_lat[k], z0[k])
                pictures.insert(1, tensor_to_image(base_img[k]))
            atomic_save_image(d / "reconstruction.png", pictures[-1])
            paths = {"inversion": f"{it.id}/inversion.safetensors", "reconstruction": f"{it.id}/reconstruction.png"}
            if cfg.output.save_strip:
                atomic_save_image(d / "strip.png", make_strip(pictures))
                paths["strip"] = f"{it.id}/strip.png"
            meta = {"id": it.id, "source": it.path, "prompt": it.prompt, "metrics": metrics, **inv.meta}
            atomic_write_bytes(d / "meta.json", json.dumps(meta, indent=2).encode())
            paths["meta"] = f"{it.id}/meta.json"
            rec = record(it, "ok", metrics=metrics, paths=paths, seconds=round(seconds, 3))
            log(format_row(rec))

    log(
        f"rank {rank}/{world}: inverting into {out_dir} on {fabric.device} at {size}px, precision "
        f"{cfg.trainer.precision}, T={cfg.inversion.num_ddim_steps}, N={cfg.inversion.num_inner_steps}"
    )
    log(format_header())
    pending: list[tuple[Item, torch.Tensor]] = []
    for item in todo():
        try:
            if item.error:
                raise ValueError(item.error)
            check_prompt(model.tokenizer, item.prompt, label=f"{item.path}")
            pending.append((item, prepare_image(item.path, size, name=item.path)))
        except (ImageError, PromptError, ValueError) as e:
            record(item, "failed", error=str(e))
            continue
        if len(pending) == cfg.inversion.batch_size:
            process(pending)
            pending = []
    if pending:
        process(pending)

    # 5. Summary
    log(
        f"rank {rank}: {len(summary.done)} inverted, {len(summary.failed)} failed, "
        f"{summary.skipped} already done; manifest {manifest}"
    )
    return summary


def format_header() -> str:
    return (
        f"{'image':<28} {'status':<7} {'PSNR no-NTI':>11} {'PSNR NTI':>9} {'(vs VAE round trip)':>20} "
        f"{'PSNR NTI vs input':>17} {'inner steps':>11} {'s/img':>7}"
    )


def format_row(rec: dict) -> str:
    if rec["status"] != "ok":
        return f"{rec['id']:<28} {'failed':<7} {rec.get('error', '')}"
    m = rec["metrics"]
    base = m.get("ddim_no_nti", {}).get("vs_vae", {}).get("psnr", float("nan"))
    return (
        f"{rec['id']:<28} {'ok':<7} {base:>9.2f}dB {m['nti']['vs_vae']['psnr']:>7.2f}dB {'':>20} "
        f"{m['nti']['vs_input']['psnr']:>15.2f}dB {m['inner_steps']:>11} {rec['seconds']:>7.1f}"
    )


def remove_output(out_dir: Path) -> None:
    shutil.rmtree(out_dir, ignore_errors=True)


__all__ = ["run_inversion", "read_manifest", "RunSummary", "OutputMismatchError", "CaptionError"]
