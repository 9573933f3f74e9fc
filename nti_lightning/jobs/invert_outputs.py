"""What ``nti invert`` writes for each finished image: inversion, metrics, record, and PNGs where wanted.

Finished images are written in groups (one batched VAE decode and one batched no-NTI replay per group:
``measure_group``). The NTI reconstruction is z̄_0 of the optimisation itself (Algorithm 1's last z̄_{t−1}):
replaying the sampler from z̄_T with {∅_t} gives the same latent, so it is not computed twice. Methods whose
engine run stops at the pivot (ddim, npi, proxnpi: ``z_0`` is None) are reconstructed by sampling their records
here. The metrics of the reconstruction are under the method's name ("nti" for NTI), and the record names the
method. Two layouts (``output.layout``):

* ``folders`` (``write_folders``): ``images/<id component>/`` (``store.files.item_relpath``) with
  inversion.safetensors, reconstruction.png, strip.png and meta.json, through ``atomic_write`` with the worker's
  temporary folder; each record is appended last, after its files exist (a kill in between leaves files the
  rerun rewrites).
* ``shards`` (``ShardOutputs``): a group's records appended to the worker's rolling tar shard in one durable
  write, then committed together (``RecordLog.append_many``); PNGs only per ``PngPolicy``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nti_lightning.api import ddim_baseline_latents, reconstruction_latents
from nti_lightning.data.ids import id_component
from nti_lightning.data.image import tensor_to_image
from nti_lightning.data.items import Item
from nti_lightning.engine.sampling import decode_latents
from nti_lightning.metrics import image_metrics, latent_mse_value
from nti_lightning.p2p.figures import labelled_strip
from nti_lightning.store.files import atomic_save_image, atomic_write, inside, item_relpath
from nti_lightning.store.inversion import Inversion, inversion_to_bytes, save_inversion
from nti_lightning.store.records import dumps
from nti_lightning.store.shard_writer import ShardWriter
from nti_lightning.store.tar_records import INVERSION_EXT, META_EXT, SHARDS_DIR, shard_file


@dataclass
class Done:
    """A finished image waiting to be written."""

    item: Item
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    inversion: Inversion
    seconds: float  # its share of the UNet calls it took part in
    source: int = 0  # its input shard's hash (``run.share``), 0 for a plain input


def group_latents(model, cfg, group: list[Done], runtime) -> dict[str, torch.Tensor]:
    """The latents a group's files need: the method's reconstruction, the VAE round trip (z*_0) and, with
    ``output.compute_baseline``, DDIM inversion replayed at w without NTI → {name: (n, C, h, w)}."""
    invs = [d.inversion for d in group]
    if all(inv.z_0 is not None for inv in invs):
        recon = torch.stack([inv.z_0 for inv in invs]).to(model.device)  # (n, C, h, w)
    else:  # the engine stopped at the pivot (ddim, npi, proxnpi): sample the records
        recon = reconstruction_latents(model, invs, runtime=runtime)
    out = {"recon": recon, "vae": torch.stack([inv.pivot_z0 for inv in invs]).to(model.device)}
    if cfg.output.compute_baseline:
        out["baseline"] = ddim_baseline_latents(model, invs, cfg.inversion.guidance_scale, runtime)
    return out


def image_record_metrics(method: str, images: dict, latents: dict, k: int, px: torch.Tensor, inv: Inversion) -> dict:
    """The metrics of image k of a group: its reconstruction and (if computed) the no-NTI one against the input
    and the VAE round trip, the latent errors against z*_0, the inner steps."""
    metrics = {
        method: {
            "vs_input": image_metrics(images["recon"][k], px),
            "vs_vae": image_metrics(images["recon"][k], images["vae"][k]),
        },
        "vae_roundtrip_vs_input": image_metrics(images["vae"][k], px),
        f"{method}_latent_mse": latent_mse_value(latents["recon"][k], latents["vae"][k]),
        "inner_steps": int(inv.inner_steps.sum()),
        "skipped_steps": int(inv.meta.get("skipped_steps", 0)),
    }
    if "baseline" in images:
        metrics["ddim_no_nti"] = {
            "vs_input": image_metrics(images["baseline"][k], px),
            "vs_vae": image_metrics(images["baseline"][k], images["vae"][k]),
        }
        metrics["ddim_no_nti_latent_mse"] = latent_mse_value(latents["baseline"][k], latents["vae"][k])
    return metrics


@dataclass
class Measured:
    """A finished image's metrics and the pictures of its strip (the method's reconstruction last)."""

    metrics: dict
    columns: list[tuple[str, torch.Tensor]]  # (label, (3, H, W) in [-1, 1])


def measure_group(model, cfg, group: list[Done], runtime) -> list[Measured]:
    """Decodes and measures ``group`` (one batched VAE decode, one batched no-NTI replay): the default
    ``measure`` of the invert job (a benchmark passes its own)."""
    method = cfg.inversion.method
    latents = group_latents(model, cfg, group, runtime)
    images = {name: decode_latents(model, z).cpu() for name, z in latents.items()}
    out = []
    for k, d in enumerate(group):
        metrics = image_record_metrics(method, images, latents, k, d.pixels, d.inversion)
        # input | VAE round trip (the best a latent method can reach) | [no NTI] | the method's reconstruction
        columns = [("input", d.pixels), ("VAE round trip", images["vae"][k])]
        if "baseline" in images:
            columns.append((f"DDIM, w={cfg.inversion.guidance_scale:g}, no NTI", images["baseline"][k]))
        columns.append((method.upper() if method != "nti" else "NTI", images["recon"][k]))
        out.append(Measured(metrics, columns))
    return out


def write_pictures(folder: Path, stem: str, m: Measured, save_strip: bool, tmp_dir: Path | None) -> dict[str, Path]:
    """``<stem>reconstruction.png`` (and ``<stem>strip.png``) in ``folder``; returns {kind: path}."""
    pictures = [tensor_to_image(x) for _, x in m.columns]
    out = {"reconstruction": atomic_save_image(folder / f"{stem}reconstruction.png", pictures[-1], tmp_dir)}
    if save_strip:
        strip = labelled_strip(pictures, [c for c, _ in m.columns])
        out["strip"] = atomic_save_image(folder / f"{stem}strip.png", strip, tmp_dir)
    return out


def write_folders(cfg, out_dir: Path, group: list[Done], measured: list[Measured], record, tmp_dir=None) -> None:
    """The folders layout: per image its folder's files, then ``record(done, **fields)`` last."""
    method = cfg.inversion.method
    for d, m in zip(group, measured):
        it, inv = d.item, d.inversion
        rel = item_relpath(it.id, cfg.output.subdirs)
        folder = inside(out_dir, rel)
        inv.meta.update(image={"id": it.id, "source": it.path})
        save_inversion(folder / "inversion.safetensors", inv, **_codec(cfg), tmp_dir=tmp_dir)
        written = write_pictures(folder, "", m, cfg.output.save_strip, tmp_dir)
        paths = {"inversion": f"{rel}/inversion.safetensors", **{k: f"{rel}/{p.name}" for k, p in written.items()}}
        meta = {"id": it.id, "source": it.path, "prompt": it.prompt, "metrics": m.metrics, **inv.meta}
        atomic_write(folder / "meta.json", dumps(meta, indent=2).encode(), tmp_dir)
        paths["meta"] = f"{rel}/meta.json"
        record(d, method=method, metrics=m.metrics, paths=paths, seconds=round(d.seconds, 3))


class PngPolicy:
    """Which images of a ``shards``-layout worker get PNGs: the first ``output.sample_images``, and those worth a
    look — a reconstruction PSNR against the VAE round trip (the part of the error the inversion owns) not finite,
    or ``output.flag_psnr_drop`` dB below the median of the worker's last ``WINDOW`` finite values (once it has
    ``MIN_SEEN``): an outlier against the run itself, whatever the model's typical quality. At most
    ``output.flagged_images`` flagged images get PNGs; every flagged record says why (``flagged``)."""

    WINDOW, MIN_SEEN = 1000, 32

    def __init__(self, first: int, drop_db: float, max_flagged: int, sampled: int = 0, flagged: int = 0) -> None:
        self.first, self.drop, self.max_flagged = first, drop_db, max_flagged
        self.sampled, self.flagged = sampled, flagged  # PNGs already written (a resumed worker counts its files)
        self.recent: deque[float] = deque(maxlen=self.WINDOW)

    def judge(self, psnr) -> tuple[str | None, str | None]:
        """(folder for the PNGs — "first", "flagged" or None —, why the image is flagged or None)."""
        why = None
        value = float("nan") if psnr is None else float(psnr)
        if self.drop > 0:
            if value != value:
                why = "reconstruction PSNR vs the VAE round trip is not finite"
            elif len(self.recent) >= self.MIN_SEEN and value < (median := float(np.median(self.recent))) - self.drop:
                drop = median - value
                why = f"reconstruction PSNR {value:.2f} dB vs the VAE round trip, {drop:.1f} dB under the median"
        if math.isfinite(value):
            self.recent.append(value)
        if self.sampled < self.first:
            self.sampled += 1
            return "first", why
        if why is not None and self.flagged < self.max_flagged:
            self.flagged += 1
            return "flagged", why
        return None, why


class ShardOutputs:
    """The ``shards`` layout of one worker: each finished image a record (``store.tar_records``) in its rolling
    shards (``store.shard_writer``); PNGs per ``PngPolicy`` under ``samples/<worker>/{first,flagged}/``."""

    def __init__(self, cfg, out_dir: Path, worker: str, committed, tmp_dir: Path | None, log) -> None:
        o = cfg.output
        self.cfg, self.out, self.worker, self.tmp = cfg, Path(out_dir), worker, tmp_dir
        self.writer = ShardWriter(
            out_dir, worker, committed, o.shard_max_bytes, o.shard_max_images, o.shard_min_images, tmp_dir, log
        )
        self.samples = self.out / "samples" / worker
        have = {k: len(list((self.samples / k).glob("*.reconstruction.png"))) for k in ("first", "flagged")}
        self.policy = PngPolicy(o.sample_images, o.flag_psnr_drop, o.flagged_images, have["first"], have["flagged"])
        # a group's records are encoded in parallel (zstd and numpy release the GIL): ∅_t's codec is the costly part
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="nti-enc")

    def encode(self, group: list[Done]) -> list[Future]:
        """Starts encoding a group's records (``inversion_to_bytes``) on the encoding threads, in order: the
        next group encodes while the commit stage writes and fsyncs this one. The futures give the bytes."""
        codec = _codec(self.cfg)
        encode = lambda d: inversion_to_bytes(d.inversion, label=d.item.label, **codec)  # noqa: E731
        for d in group:
            d.inversion.meta.update(image={"id": d.item.id, "source": d.item.path})
        return [self.pool.submit(encode, d) for d in group]

    def write(
        self, group: list[Done], measured: list[Measured], blobs: list[Future]
    ) -> list[tuple[Done, dict, tuple[int, int]]]:
        """Writes a group's records (``blobs``: from ``encode``) as one durable append; returns (done, record
        fields, (shard, offset)) each, for the caller to commit."""
        method, records, fields = self.cfg.inversion.method, [], []
        for d, m, future in zip(group, measured, blobs):
            data = future.result()
            it, inv = d.item, d.inversion
            meta = {"id": it.id, "source": it.path, "prompt": it.prompt, "metrics": m.metrics, **inv.meta}
            kind, why = self.policy.judge(m.metrics[method]["vs_vae"]["psnr"])
            paths = {}
            if kind is not None:
                stem = f"{id_component(it.id)}."
                written = write_pictures(self.samples / kind, stem, m, self.cfg.output.save_strip, self.tmp)
                paths = {k: str(p.relative_to(self.out)) for k, p in written.items()}
            f = {"method": method, "metrics": m.metrics, "paths": paths, "seconds": round(d.seconds, 3)}
            fields.append(f if why is None else {**f, "flagged": why})
            records.append((it.id, [(INVERSION_EXT, data), (META_EXT, dumps(meta).encode())]))
        where = self.writer.append(records)
        for f, (n, offset) in zip(fields, where):
            f["paths"] = {"shard": f"{SHARDS_DIR}/{shard_file(self.worker, n)}", "offset": offset, **f["paths"]}
        return list(zip(group, fields, where))

    def finish(self) -> None:
        self.writer.finish()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.writer.close()


def _codec(cfg) -> dict:
    """``save_inversion``'s storage codec and zstd level arguments, where the configuration has them."""
    given = {"codec": getattr(cfg.output, "codec", None), "level": getattr(cfg.output, "codec_level", None)}
    return {k: v for k, v in given.items() if v is not None}


def make_metrics_logger(kind: str, root: Path, shard: int, flush_every: int, log):
    """Rank 0's Lightning logger of per-image loss and inner steps, in ``root/metrics_shard{shard}/version_*``:
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


def image_log_metrics(inv: Inversion) -> dict[str, float]:
    """Fixed columns per finished image (a new column makes CSVLogger rewrite its whole file)."""
    loss, inner = inv.final_loss.float(), inv.inner_steps.float()
    return {
        "loss_mean": float(loss.nanmean()),
        "loss_max": float(loss.nan_to_num(0).max()),
        "inner_steps_mean": float(inner.mean()),
        "inner_steps_total": float(inner.sum()),
        "finished_at": time.time(),
    }


def format_header(method: str = "nti") -> str:
    name = "NTI" if method == "nti" else method
    return (
        f"{'image':<28} {'status':<7} {'no-NTI*':>11} {name + '*':>9} {name + ' vs input':>17} {'inner steps':>11} "
        f"{'s/img':>7}    (* PSNR vs the VAE round trip; s/img: the image's share of its UNet calls)"
    )


def _psnr(value) -> str:
    return "      inf" if value is None else f"{value:>7.2f}dB"


def format_row(rec: dict) -> str:
    if rec["status"] != "ok":
        return f"{rec['id']:<28} {'failed':<7} {rec.get('error', '')}"
    m = json.loads(dumps(rec["metrics"]))  # strict JSON: an infinite PSNR (identical images) is None here
    base = m.get("ddim_no_nti", {}).get("vs_vae", {}).get("psnr", float("nan"))
    rec_m = m[rec.get("method", "nti")]  # the method's reconstruction
    base_s = "        n/a" if base != base else f"{base:>9.2f}dB" if base is not None else "        inf"
    return (
        f"{rec['id']:<28} {'ok':<7} {base_s} {_psnr(rec_m['vs_vae']['psnr'])} "
        f"{_psnr(rec_m['vs_input']['psnr']):>17} {m['inner_steps']:>11} {rec['seconds']:>7.2f}"
    )
