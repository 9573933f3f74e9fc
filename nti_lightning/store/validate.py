"""Checks of an inversion record before anything is done with it: shapes, dtypes, finiteness and meta, then
against the model that is to use it.

A record file is input like any other: a damaged or hand-edited one must fail with one line naming the file,
what is wrong and what to do — not with an IndexError deep in sampling, an all-black image from NaN null
embeddings, or a 137 GB allocation from a latent 16× the size its meta describes. ``check_file`` runs on what
was read from disk before an ``Inversion`` is built; ``check_tensors`` and ``check_meta`` on any ``Inversion``
(file or memory);
``check_model`` against the model (its latent channels, VAE factor, null shapes, timesteps). The compatibility
checks (family, fingerprint, scheduler) stay in ``inversion.check_compatible``; ``inversion.validate_record``
runs them all in this order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

FIX_DAMAGED = "the file is damaged or was not written by nti_lightning; invert the image again"
FIX_UNVERIFIABLE = "records written by nti_lightning always have it; invert the image again"
MAX_LATENT_SIDE = 512
"""Largest latent side a record may hold before its model is known (4096 px at SD's VAE factor 8)."""
MAX_SIZE_FACTOR = 4
"""With the model known, a record's image side may be at most this many times the model's native size (SD1.x:
2048 px, SDXL 4096 px, the tiny models 512 px): beyond it the attention maps of one UNet call reach tens of GB
(the tiny model's 2048 px record asked for 137 GB)."""
REQUIRED_META = ("model_fingerprint", "scheduler", "hyperparameters", "image_size")
"""Meta keys every record this package has written carries (format version 1, since its first release)."""


META_TYPES = {"model_fingerprint": str, "scheduler": dict, "hyperparameters": dict, "sampling": dict,
              "family": str, "prediction_type": str, "model_source": str, "method": str}  # fmt: skip
"""The type of each meta key that this package reads, where present and not null."""


class InvalidInversionError(ValueError):
    """An inversion record that is damaged, hand-edited or not what this package writes; the message names the
    file, what is wrong and what to do."""


def _fail(label: str, what: str, fix: str = FIX_DAMAGED) -> InvalidInversionError:
    return InvalidInversionError(f"{label}: {what}; {fix}")


def _json_name(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
             type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_file(record: Any, tensors: dict[str, torch.Tensor], required: tuple[str, ...], label: str) -> None:
    """What ``load_inversion`` read: the JSON record is an object with a string prompt and an object meta, and
    every required tensor is there."""
    if not isinstance(record, dict):
        raise _fail(label, f"its nti_lightning header is a JSON {_json_name(record)}, not an object")
    if not isinstance(record.get("prompt"), str):
        raise _fail(label, "its record has no prompt string")
    if not isinstance(record.get("meta"), dict):
        raise _fail(label, f"its meta is a JSON {_json_name(record.get('meta'))}, not an object")
    missing = [k for k in required if k not in tensors]
    if missing:
        raise _fail(label, f"tensor(s) {', '.join(missing)} missing")


def _check_kind(label: str, fix: str, name: str, t: Any, rank: int, floating: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise _fail(label, f"{name} is {type(t).__name__}, not a tensor", fix)
    ok_dtype = t.is_floating_point() if floating else (not t.is_floating_point() and t.dtype != torch.bool)
    if not ok_dtype or t.is_complex():
        want = "a floating-point" if floating else "an integer"
        raise _fail(label, f"{name} has dtype {t.dtype}, not {want} dtype", fix)
    if t.dim() != rank:
        raise _fail(label, f"{name} has shape {_shape(t)}, not {rank} dimensions", fix)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``: numpy's check on a CPU tensor numpy holds (~30× faster than torch's on SD1.5's
    ∅_t, 3·10^6 values: 0.2 vs 6 ms), torch's otherwise."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64, torch.float16):
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())


def _check_finite(label: str, fix: str, name: str, t: torch.Tensor) -> None:
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise _fail(label, f"{name} holds {bad} non-finite value(s) (NaN or inf)", fix)


def check_tensors(inv, label: str, fix: str = FIX_DAMAGED) -> None:
    """Ranks, dtypes, the shapes that must agree with each other, and finiteness of every tensor of ``inv``.

    final_loss may be NaN at a timestep where no inner step ran (no loss was computed there), never inf. ``fix``
    ends each message (what the reader of a file, or the writer of a record, is to do)."""
    # 1. Ranks and dtypes
    latents = ("z_T", "pivot_z0", "pivot_zT")
    for name in latents:
        _check_kind(label, fix, name, getattr(inv, name), 3, floating=True)
    _check_kind(label, fix, "null_embeddings", inv.null_embeddings, 3, floating=True)
    for name in ("timesteps", "inner_steps"):
        _check_kind(label, fix, name, getattr(inv, name), 1, floating=False)
    _check_kind(label, fix, "final_loss", inv.final_loss, 1, floating=True)
    # 2. Shapes that must agree: T steps everywhere, one latent shape
    T = len(inv.timesteps)
    lengths = {"null_embeddings": len(inv.null_embeddings), "inner_steps": len(inv.inner_steps),
               "final_loss": len(inv.final_loss)}  # fmt: skip
    if T < 1 or any(n != T for n in lengths.values()):
        got = ", ".join(f"{k} {n}" for k, n in lengths.items())
        raise _fail(label, f"timesteps has {T} steps but {got}: every per-step tensor has one row per timestep", fix)
    shape = inv.z_T.shape
    if min(shape) < 1:
        raise _fail(label, f"z_T has shape {_shape(inv.z_T)}: an empty latent", fix)
    for name in latents[1:]:
        if getattr(inv, name).shape != shape:
            raise _fail(label, f"{name} has shape {_shape(getattr(inv, name))} but z_T {_shape(inv.z_T)}", fix)
    if shape[1] > MAX_LATENT_SIDE or shape[2] > MAX_LATENT_SIDE:
        raise _fail(label, f"z_T {_shape(inv.z_T)} is larger than any model's latent (side > {MAX_LATENT_SIDE})", fix)
    optional = {"trajectory": (T + 1, *shape), "corrections": (T, *shape)}
    for name, want in optional.items():
        t = getattr(inv, name)
        if t is not None:
            _check_kind(label, fix, name, t, 4, floating=True)
            if tuple(t.shape) != want:
                raise _fail(label, f"{name} has shape {_shape(t)}, not {want} (T + 1 or T latents like z_T)", fix)
    for key, t in inv.null_extra.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise _fail(label, f"null_embeddings.{key} is not a floating-point tensor", fix)
        if t.dim() < 2 or len(t) != T:
            raise _fail(label, f"null_embeddings.{key} has shape {_shape(t)}, not (T={T}, …)", fix)
    # 3. Finite values (NaN null embeddings reconstruct an all-black image)
    for name in (*latents, "null_embeddings", "trajectory", "corrections"):
        if getattr(inv, name) is not None:
            _check_finite(label, fix, name, getattr(inv, name))
    for key, t in inv.null_extra.items():
        _check_finite(label, fix, f"null_embeddings.{key}", t)
    loss = inv.final_loss
    if torch.isinf(loss).any() or (torch.isnan(loss) & (inv.inner_steps > 0)).any():
        raise _fail(label, "final_loss holds inf, or NaN at a timestep where inner steps ran", fix)
    if (inv.inner_steps < 0).any():
        raise _fail(label, "inner_steps holds a negative count", fix)


def check_meta(inv, label: str) -> None:
    """``meta`` is an object with the keys every record has, of the right types; a nulled identity key makes the
    record unverifiable against a model, so it is refused."""
    meta = inv.meta
    if not isinstance(meta, dict):
        raise _fail(label, f"its meta is a JSON {_json_name(meta)}, not an object")
    if not isinstance(inv.prompt, str):
        raise _fail(label, f"its prompt is {type(inv.prompt).__name__}, not a string")
    # records from before model families lack family and prediction_type; one that has them null was edited
    for key in (*REQUIRED_META, *(k for k in ("family", "prediction_type") if k in meta)):
        if meta.get(key) is None:
            what = "missing" if key not in meta else "null"
            raise _fail(
                label, f"meta.{key} is {what}, so the record cannot be checked against a model", FIX_UNVERIFIABLE
            )
    for key, kind in META_TYPES.items():
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise _fail(label, f"meta.{key} is a JSON {_json_name(meta[key])}, not {_json_name(kind())}")
    size = meta["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise _fail(label, f"meta.image_size is {size!r}, not an image side in pixels")
    h = inv.z_T.shape[-1]
    if size % h or (size // h) & (size // h - 1) or inv.z_T.shape[-2] != h:
        raise _fail(label, f"z_T {_shape(inv.z_T)} does not fit meta.image_size {size} px at any VAE factor")
    w = meta["hyperparameters"].get("guidance_scale")
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or w != w or abs(w) == float("inf")):
        raise _fail(label, f"meta.hyperparameters.guidance_scale is {w!r}, not a finite number")
    sampling = (meta.get("sampling") or {}).get("kind")
    needs = {"direct": "corrections", "proximal": "trajectory"}.get(sampling)
    if needs is not None and getattr(inv, needs) is None:
        raise _fail(label, f"meta.sampling.kind is {sampling!r} but the record holds no {needs} tensor")


def check_model(inv, model, label: str) -> None:
    """``inv`` fits ``model``: latent channels, the VAE factor and a bounded size, the null's shapes, timesteps
    inside the training schedule."""
    f = model.vae_scale_factor
    channels = int(model.unet.config.in_channels)
    size, side = inv.meta["image_size"], inv.z_T.shape[-1]
    if inv.z_T.shape[0] != channels:
        raise _fail(label, f"z_T has {inv.z_T.shape[0]} channels but the model's UNet takes {channels}")
    if side * f != size:
        raise _fail(label, f"z_T {_shape(inv.z_T)} is not the latent of a {size} px image (VAE factor {f})")
    limit = MAX_SIZE_FACTOR * model.native_image_size
    if size > limit:
        raise _fail(
            label,
            f"meta.image_size {size} px is over {MAX_SIZE_FACTOR}× the model's native {model.native_image_size} px "
            "(its attention maps would take tens of GB)",
            f"invert the image again with inversion.image_size at most {limit}",
        )
    null = inv.sized_family(model).null(model, 1)  # {key: (1, …)}: the model's ∅ shapes
    want = tuple(null["prompt_embeds"].shape[1:])
    if tuple(inv.null_embeddings.shape[1:]) != want:
        raise _fail(label, f"null_embeddings {_shape(inv.null_embeddings)} do not match the model's null (T, {want})")
    for key, t in inv.null_extra.items():
        if key == "prompt_embeds" or key not in null:
            raise _fail(label, f"null_embeddings.{key} is not a key of the model's null ({', '.join(null)})")
        if tuple(t.shape[1:]) != tuple(null[key].shape[1:]):
            raise _fail(label, f"null_embeddings.{key} {_shape(t)} does not match the model's {_shape(null[key][0])}")
    n_train = int(model.scheduler.config.num_train_timesteps)
    if len(inv.timesteps) > n_train or (inv.timesteps < 0).any() or (inv.timesteps >= n_train).any():
        raise _fail(label, f"timesteps are not {len(inv.timesteps)} steps of the model's {n_train}-step schedule")
