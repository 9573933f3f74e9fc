"""What ties an output folder to its settings: ``run.json`` holds the run's identity; a rerun must match it."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from nti_lightning.api import image_size_for
from nti_lightning.config import RunConfig
from nti_lightning.store.files import atomic_write_bytes

# settings that change how fast a run goes, not what it computes (batch_invariant: bits, not results)
NOT_IDENTITY = ("batch_size", "slots", "batch_invariant")
# fields added after folders were made: left out of the identity while at their defaults, so those folders still
# match (a run with another method, or proximal settings of proxnpi, is a different run)
LATER_FIELDS = ("method", "prox_operator", "prox_quantile", "prox_recon_t", "prox_recon_lr", "prox_dilate")


class OutputMismatchError(RuntimeError):
    """The output folder holds results of a different model or hyperparameters."""


def run_identity(cfg: RunConfig, model) -> dict:
    """What must not change between runs writing into one folder."""
    defaults = asdict(type(cfg.inversion)())
    inversion = {
        k: v
        for k, v in asdict(cfg.inversion).items()
        if k not in NOT_IDENTITY and not (k in LATER_FIELDS and v == defaults[k])
    }
    inversion["image_size"] = image_size_for(model, cfg.inversion)  # null and the size it resolves to are one
    return {
        "model_fingerprint": model.fingerprint,
        "model_source": model.source,
        # a single-file checkpoint's config folder sets its scheduler and prediction type; only present then,
        # so the run.json of folder and embedded models stays as it was
        **({"model_config_dir": model.config_dir} if model.config_dir else {}),
        "inversion": inversion,
        "image_size": image_size_for(model, cfg.inversion),
        "precision": cfg.trainer.precision,
    }


def identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (``inversion.guidance_scale``)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def check_output_identity(out_dir: Path, identity: dict, overwrite: bool) -> None:
    path = out_dir / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != identity:
            if not overwrite:
                diff = identity_diff(old, identity)
                shown = "; ".join(f"{k}: {_get(old, k)!r} there, {_get(identity, k)!r} now" for k in diff)
                raise OutputMismatchError(
                    f"{out_dir} holds results made with other settings ({shown}). "
                    "Use another --output, or pass --overwrite to start this folder over."
                )
            for p in out_dir.glob("manifest*.jsonl"):
                p.unlink()
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    atomic_write_bytes(path, json.dumps(identity, indent=2, sort_keys=True).encode())
