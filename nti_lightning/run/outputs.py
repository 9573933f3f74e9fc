"""What a dataset run writes for each finished image: inversion, reconstruction, strip, metrics, manifest row.

Finished images are written in groups (one batched VAE decode and one batched no-NTI replay per group). The
NTI reconstruction is z̄_0 of the optimisation itself (Algorithm 1's last z̄_{t−1}): replaying the sampler from
z̄_T with {∅_t} gives the same latent, so it is not computed twice. Methods whose engine run stops at the pivot
(ddim, npi, proxnpi: ``z_0`` is None) are reconstructed by sampling their records here. The metrics of the
reconstruction are under the method's name ("nti" for NTI), and the manifest row records the method.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nti_lightning.api import ddim_baseline_latents, reconstruction_latents
from nti_lightning.data.image import tensor_to_image
from nti_lightning.data.items import Item
from nti_lightning.engine.sampling import decode_latents
from nti_lightning.metrics import image_metrics, latent_mse_value, make_strip
from nti_lightning.store.files import atomic_save_image, atomic_write_bytes, item_relpath
from nti_lightning.store.inversion import Inversion, save_inversion

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
    skipped_failed: int = 0  # of ``skipped``: recorded as failed before (not retried)
    preempted: bool = False
    interrupted: bool = False  # Ctrl-C: state saved, exit 130
    resumed: int = 0
    skipped_steps: int = 0
    rank: int = 0

    def add(self, rec: dict) -> None:
        ok = rec["status"] == "ok"
        self.n_done += ok
        self.n_failed += not ok
        rows = self.done if ok else self.failed
        if len(rows) < SUMMARY_ROWS:
            rows.append(rec)

    def merge(self, other: RunSummary) -> None:
        """Adds another rank's counts and rows: the launching rank reports the run, not only itself."""
        for name in ("n_done", "n_failed", "skipped", "skipped_failed", "resumed", "skipped_steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.done += other.done[: max(SUMMARY_ROWS - len(self.done), 0)]
        self.failed += other.failed[: max(SUMMARY_ROWS - len(self.failed), 0)]
        self.preempted |= other.preempted
        self.interrupted |= other.interrupted

    def save(self, path: Path) -> None:
        fields = {k: v for k, v in vars(self).items() if k != "output"}
        atomic_write_bytes(path, json.dumps(fields).encode())

    @classmethod
    def load(cls, path: Path, output: Path) -> RunSummary:
        return cls(output=output, **json.loads(path.read_text(encoding="utf-8")))


@dataclass
class Done:
    """A finished image waiting to be written."""

    item: Item
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    inversion: Inversion
    seconds: float


def write_group(model, cfg, out_dir: Path, group: list[Done], runtime, record) -> None:
    """Decodes, measures and writes ``group``; ``record(item, "ok", **fields)`` appends each manifest row last,
    after its files exist (a kill in between leaves files that the rerun overwrites)."""
    invs = [d.inversion for d in group]
    if all(inv.z_0 is not None for inv in invs):
        nti_lat = torch.stack([inv.z_0 for inv in invs]).to(model.device)  # (n, C, h, w)
    else:  # the engine stopped at the pivot (ddim, npi, proxnpi): sample the records
        nti_lat = reconstruction_latents(model, invs, runtime=runtime)
    method = cfg.inversion.method
    z0 = torch.stack([inv.pivot_z0 for inv in invs]).to(model.device)
    nti_img = decode_latents(model, nti_lat).cpu()
    vae_img = decode_latents(model, z0).cpu()
    if cfg.output.compute_baseline:
        base_lat = ddim_baseline_latents(model, invs, cfg.inversion.guidance_scale, runtime)
        base_img = decode_latents(model, base_lat).cpu()
    for k, d in enumerate(group):
        it, px, inv = d.item, d.pixels, d.inversion
        rel = item_relpath(it.id, cfg.output.subdirs)
        folder = out_dir / rel
        inv.meta.update(image={"id": it.id, "source": it.path})
        save_inversion(folder / "inversion.safetensors", inv, codec=cfg.output.codec)
        metrics = {
            method: {"vs_input": image_metrics(nti_img[k], px), "vs_vae": image_metrics(nti_img[k], vae_img[k])},
            "vae_roundtrip_vs_input": image_metrics(vae_img[k], px),
            "nti_latent_mse": latent_mse_value(nti_lat[k], z0[k]),
            "inner_steps": int(inv.inner_steps.sum()),
            "skipped_steps": int(inv.meta.get("skipped_steps", 0)),
        }
        # input | VAE round trip (the best a latent method can reach) | [no NTI] | NTI
        pictures = [tensor_to_image(px), tensor_to_image(vae_img[k]), tensor_to_image(nti_img[k])]
        if cfg.output.compute_baseline:
            metrics["ddim_no_nti"] = {
                "vs_input": image_metrics(base_img[k], px),
                "vs_vae": image_metrics(base_img[k], vae_img[k]),
            }
            metrics["ddim_no_nti_latent_mse"] = latent_mse_value(base_lat[k], z0[k])
            pictures.insert(2, tensor_to_image(base_img[k]))
        atomic_save_image(folder / "reconstruction.png", pictures[-1])
        paths = {"inversion": f"{rel}/inversion.safetensors", "reconstruction": f"{rel}/reconstruction.png"}
        if cfg.output.save_strip:
            atomic_save_image(folder / "strip.png", make_strip(pictures))
            paths["strip"] = f"{rel}/strip.png"
        meta = {"id": it.id, "source": it.path, "prompt": it.prompt, "metrics": metrics, **inv.meta}
        atomic_write_bytes(folder / "meta.json", json.dumps(meta, indent=2).encode())
        paths["meta"] = f"{rel}/meta.json"
        record(it, "ok", method=method, metrics=metrics, paths=paths, seconds=round(d.seconds, 3))


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
    rec_m = m[rec.get("method", "nti")]  # the method's reconstruction (the NTI column for nti)
    return (
        f"{rec['id']:<28} {'ok':<7} {base:>9.2f}dB {rec_m['vs_vae']['psnr']:>7.2f}dB "
        f"{rec_m['vs_input']['psnr']:>15.2f}dB {m['inner_steps']:>11} {rec['seconds']:>7.1f}"
    )
