"""What ``nti invert`` writes for each finished image: inversion, reconstruction, labelled strip, metrics, record.

Finished images are written in groups (one batched VAE decode and one batched no-NTI replay per group). The
NTI reconstruction is z̄_0 of the optimisation itself (Algorithm 1's last z̄_{t−1}): replaying the sampler from
z̄_T with {∅_t} gives the same latent, so it is not computed twice. Methods whose engine run stops at the pivot
(ddim, npi, proxnpi: ``z_0`` is None) are reconstructed by sampling their records here. The metrics of the
reconstruction are under the method's name ("nti" for NTI), and the record names the method. Files go to
``images/<id component>/`` (``store.files.item_relpath``) through ``atomic_write`` with the worker's temporary
folder; the record is appended last, after its files exist (a kill in between leaves files the rerun rewrites).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nti_lightning.api import ddim_baseline_latents, reconstruction_latents
from nti_lightning.data.image import tensor_to_image
from nti_lightning.data.items import Item
from nti_lightning.engine.sampling import decode_latents
from nti_lightning.metrics import image_metrics, latent_mse_value
from nti_lightning.p2p.figures import labelled_strip
from nti_lightning.run.records import dumps
from nti_lightning.store.files import atomic_save_image, atomic_write, inside, item_relpath
from nti_lightning.store.inversion import Inversion, save_inversion


@dataclass
class Done:
    """A finished image waiting to be written."""

    item: Item
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    inversion: Inversion
    seconds: float  # its share of the UNet calls it took part in


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


def write_group(model, cfg, out_dir: Path, group: list[Done], runtime, record, tmp_dir: Path | None = None) -> None:
    """Decodes, measures and writes ``group``; ``record(item, "ok", **fields)`` appends each record last."""
    method = cfg.inversion.method
    latents = group_latents(model, cfg, group, runtime)
    images = {name: decode_latents(model, z).cpu() for name, z in latents.items()}
    for k, d in enumerate(group):
        it, px, inv = d.item, d.pixels, d.inversion
        rel = item_relpath(it.id, cfg.output.subdirs)
        folder = inside(out_dir, rel)
        inv.meta.update(image={"id": it.id, "source": it.path})
        save_inversion(folder / "inversion.safetensors", inv, **_codec(cfg), tmp_dir=tmp_dir)
        metrics = image_record_metrics(method, images, latents, k, px, inv)
        # input | VAE round trip (the best a latent method can reach) | [no NTI] | the method's reconstruction
        columns = [("input", px), ("VAE round trip", images["vae"][k])]
        if "baseline" in images:
            columns.append((f"DDIM, w={cfg.inversion.guidance_scale:g}, no NTI", images["baseline"][k]))
        columns.append((method.upper() if method != "nti" else "NTI", images["recon"][k]))
        pictures = [tensor_to_image(x) for _, x in columns]
        atomic_save_image(folder / "reconstruction.png", pictures[-1], tmp_dir)
        paths = {"inversion": f"{rel}/inversion.safetensors", "reconstruction": f"{rel}/reconstruction.png"}
        if cfg.output.save_strip:
            atomic_save_image(folder / "strip.png", labelled_strip(pictures, [c for c, _ in columns]), tmp_dir)
            paths["strip"] = f"{rel}/strip.png"
        meta = {"id": it.id, "source": it.path, "prompt": it.prompt, "metrics": metrics, **inv.meta}
        atomic_write(folder / "meta.json", dumps(meta, indent=2).encode(), tmp_dir)
        paths["meta"] = f"{rel}/meta.json"
        record(it, "ok", method=method, metrics=metrics, paths=paths, seconds=round(d.seconds, 3))


def _codec(cfg) -> dict:
    """``save_inversion``'s storage codec argument, where the configuration has one."""
    codec = getattr(cfg.output, "codec", None)
    return {"codec": codec} if codec is not None else {}


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
