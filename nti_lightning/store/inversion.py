"""The result of inverting one image — by Null-text Inversion or another method — and its file format.

File: one ``.safetensors`` with the tensors and, in the header's metadata, a JSON record (prompt, model
identity, scheduler, hyperparameters, method). Written atomically (temp file + rename). Every method
(``inverters.py``) gives this one record kind; ``meta["method"]`` says which (files without it are "nti"),
``meta["sampling"]`` what reconstruction and editing apply besides guidance (``step_guidance.py``), and the
optional tensors what that needs (the pivot for proxnpi, the per-step corrections for direct).

∅_t goes through a storage codec (``codec.py``, docs/storage.md): format 4 holds each of its fields as a
uint8 tensor of encoded bytes, with the codec's info (its packing among it) in the record's "codecs", the
optional trajectory and corrections the same way through the exact codec, and pivot_zT once, as z_T
(``SAME_AS``); codec "fp32" writes format 1, every tensor as it is (the files from before codecs). Formats 1–4
are read. Everything but ∅_t stays exact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from nti_lightning.store.codec import decode, encode
from nti_lightning.store.codec_names import DEFAULT_CODEC, LOSSLESS_CODEC, RAW_CODEC, ZSTD_LEVEL, parse_codec
from nti_lightning.store.files import atomic_write
from nti_lightning.store.validate import (
    FIX_DAMAGED,
    InvalidInversionError,
    check_file,
    check_meta,
    check_model,
    check_tensors,
)

FORMAT_VERSION = 4
"""Records with ∅_t through a codec, each field's packing named in its codec info (``codec.PACKS``), and a latent
equal to z_T stored once (``SAME_AS``); version 3 is the same with every field byte-shuffled, version 2 also
without "same" (both read as they are); ``RAW_FORMAT_VERSION`` (1): codec "fp32", every tensor as it is."""
RAW_FORMAT_VERSION = 1
READ_VERSIONS = (1, 2, 3, 4)
SAME_AS = {"pivot_zT": "z_T"}
"""Fields kept once when equal: z̄_T = z*_T (Algorithm 1, line 1), so every method's pivot end is its z_T — a
latent of 4·64·64 fp32 for SD1.5, ~2 % of a default record. The record's "same" lists what was left out."""
TENSOR_FIELDS = ("z_T", "null_embeddings", "timesteps", "pivot_z0", "pivot_zT", "inner_steps", "final_loss")
OPTIONAL_TENSOR_FIELDS = ("trajectory", "corrections")
NULL_EXTRA_PREFIX = "null_embeddings."
"""File names of ``Inversion.null_extra``: "null_embeddings.text_embeds", …"""
EXACT_NULL_KEYS = ("time_ids",)
"""``null_extra`` keys kept exact whatever the codec: SDXL's 6 pixel sizes per step feed sinusoidal
embeddings, where bf16's step (8 at 1024) would move them; they are 24 bytes a step."""


FIX_NOT_SAVED = "not saved (a non-finite or misshapen result is never written as an inversion)"


class IncompatibleInversionError(ValueError):
    """An inversion used with a model or scheduler other than the one that made it."""


@dataclass
class Inversion:
    """Algorithm 1's output for one image (or another method's, in the same shape), plus what is needed to use
    and audit it."""

    z_T: torch.Tensor  # (C, h, w): z̄_T = z*_T, the start of reconstruction and editing
    null_embeddings: torch.Tensor  # (T, L, D): ∅_t for timesteps[i]
    timesteps: torch.Tensor  # (T,) long, sampling order (981 … 1)
    prompt: str
    pivot_z0: torch.Tensor  # (C, h, w): z*_0, the encoded image
    pivot_zT: torch.Tensor  # (C, h, w): z*_T, end of the DDIM inversion (w = 1)
    inner_steps: torch.Tensor  # (T,) long: Adam steps applied per timestep
    final_loss: torch.Tensor  # (T,) float: last inner-step loss per timestep
    meta: dict[str, Any] = field(default_factory=dict)
    """model_source, model_config_dir (a single-file checkpoint's config folder, else None), model_fingerprint,
    method, family ("sd1", "sd2", "sd2-v", "sdxl"), prediction_type ("epsilon", "v_prediction"), scheduler,
    hyperparameters, image_size, image, precision, …"""
    z_0: torch.Tensor | None = None  # (C, h, w): z̄_0 from the optimisation (in memory only; None: not sampled)
    trajectory: torch.Tensor | None = None  # (T + 1, C, h, w): z*_0 … z*_T (proxnpi's inversion guidance)
    corrections: torch.Tensor | None = None  # (T, C, h, w): Direct Inversion's c_t = z*_{t−1} − z_{t−1}, per i
    null_extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """∅_t's other optimised keys, {key: (T, …)}: SDXL's text_embeds (T, 1280), and time_ids (T, 6) where
    ``InversionConfig.optimize`` asks; keys not here are the model's null (``Family.null``)."""

    @property
    def method(self) -> str:
        """The inverter that made this record (``InversionConfig.method``); "nti" for files from before."""
        return str(self.meta.get("method", "nti"))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def null(self, i: int, model=None, fill: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """∅_t of timestep index i as a one-row conditioning ({"prompt_embeds": (1, L, D), …}), on the model's
        device if a model is given. Keys the family's conditioning has but the record does not optimise (SDXL's
        time_ids by default) are taken from ``fill`` (one-row), else from the model's null."""
        device = model.device if model is not None else None
        out = {"prompt_embeds": self.null_embeddings[i][None].to(device)}
        out.update({k: v[i][None].to(device) for k, v in self.null_extra.items()})
        if fill is None and model is not None and set(model.family.cond_keys) - set(out):
            fill = self.sized_family(model).null(model, 1)
        if fill is not None:
            out.update({k: v.to(device) for k, v in fill.items() if k not in out})
        return out

    def nulls(self, model) -> list[dict[str, torch.Tensor]]:
        """[∅_t for every timestep index] (``null``), the model's null computed once."""
        missing = set(model.family.cond_keys) - {"prompt_embeds", *self.null_extra}
        fill = self.sized_family(model).null(model, 1) if missing else None
        return [self.null(i, model, fill) for i in range(self.num_steps)]

    def sized_family(self, model):
        """``model.family`` at the size this record was inverted at (SDXL's time ids follow it)."""
        return model.family.at_size(self.meta.get("image_size"))


def inversion_to_bytes(
    inv: Inversion, codec: str = DEFAULT_CODEC, label: str = "inversion", level: int = ZSTD_LEVEL
) -> bytes:
    """``inv`` as the bytes of its .safetensors file, ∅_t through ``codec`` (``codec_names.CODECS``) at zstd
    ``level``; a non-finite or misshapen record is refused (``InvalidInversionError`` naming ``label``), never
    written."""
    check_tensors(inv, label, fix=FIX_NOT_SAVED)
    parse_codec(codec)  # a clear error for a name that is none, whatever the fields hold
    tensors = {name: getattr(inv, name).detach().cpu() for name in TENSOR_FIELDS + OPTIONAL_TENSOR_FIELDS
               if getattr(inv, name) is not None}  # fmt: skip
    tensors.update({NULL_EXTRA_PREFIX + k: v.detach().cpu() for k, v in inv.null_extra.items()})
    record: dict[str, Any] = {"format_version": RAW_FORMAT_VERSION, "prompt": inv.prompt, "meta": inv.meta}
    # 1. as encoded bytes (format 4): ∅_t's fields through the codec, the optional fields through the exact
    #    one; codec "fp32" keeps the format-1 layout
    if codec != RAW_CODEC:
        nulls = ["null_embeddings"] + [NULL_EXTRA_PREFIX + k for k in inv.null_extra if k not in EXACT_NULL_KEYS]
        codecs = {name: field_codec(tensors[name], codec) for name in nulls}
        codecs.update({name: LOSSLESS_CODEC for name in OPTIONAL_TENSOR_FIELDS if name in tensors})
        infos = {}
        for name, field in codecs.items():
            data, infos[name] = encode(tensors[name], field, level)
            tensors[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # (n_bytes,)
        same = {k: v for k, v in SAME_AS.items() if torch.equal(tensors[k], tensors[v])}
        for k in same:
            del tensors[k]
        record.update(format_version=FORMAT_VERSION, codecs=infos, same=same)
    # 2. own, dense copies of the rest: z_T and pivot_zT are one tensor in memory, and batch slices are views
    encoded = record.get("codecs", {})
    tensors = {k: v if k in encoded else v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    return save(tensors, metadata={"nti_lightning": json.dumps(record)})


def field_codec(x: torch.Tensor, codec: str) -> str:
    """``codec`` for a (T, …) field of ∅_t, or ``LOSSLESS_CODEC`` where every row is the first: the methods
    whose ∅_t is a fixed null (ddim, direct: ψ(""); npi, proxnpi: ψ(P)) keep it bit for bit — Direct
    Inversion's corrections are exact only against it — at the size of one row, as the lossy codecs cost."""
    return LOSSLESS_CODEC if torch.equal(x, x[:1].expand_as(x)) else codec


def inversion_from_bytes(data: bytes, label: str = "inversion") -> Inversion:
    """The ``Inversion`` in a .safetensors file's bytes (format 1 or 2); errors name ``label`` (the file)."""
    # 1. the record, from the header (safetensors' load(bytes) returns the tensors without the metadata)
    record = _header_record(data, label)
    if not isinstance(record, dict):
        check_file(record, {}, TENSOR_FIELDS, label)  # says what the header is instead of an object
    if record.get("format_version") not in READ_VERSIONS:
        raise ValueError(
            f"{label}: format version {record.get('format_version')} is not one this version reads "
            f"({', '.join(map(str, READ_VERSIONS))}); upgrade nti_lightning"
        )
    try:
        tensors = load(data)
    except SafetensorError as e:
        raise InvalidInversionError(f"{label}: not a readable inversion file ({e}); {FIX_DAMAGED}") from e
    # 2. ∅_t's encoded fields back to float32
    for name, info in record.get("codecs", {}).items():
        try:
            tensors[name] = decode(tensors[name].numpy().tobytes(), info)
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
        ) as e:  # CodecError, or an info this version cannot read
            raise InvalidInversionError(
                f"{label}: field {name!r} ({info.get('codec') if isinstance(info, dict) else info}) is corrupt: {e}; "
                f"{FIX_DAMAGED}"
            ) from e
    # 3. the fields kept once (formats 3–4), then the record, its fields checked (store/validate.py)
    same = record.get("same", {})
    if not isinstance(same, dict) or any(SAME_AS.get(k) != v or v not in tensors for k, v in same.items()):
        raise InvalidInversionError(
            f'{label}: its record\'s "same" ({same!r}) is not one this version reads; {FIX_DAMAGED}'
        )
    tensors.update({k: tensors[v] for k, v in same.items()})
    check_file(record, tensors, TENSOR_FIELDS, label)
    optional = {k: tensors[k] for k in OPTIONAL_TENSOR_FIELDS if k in tensors}
    extra = {k[len(NULL_EXTRA_PREFIX) :]: v for k, v in tensors.items() if k.startswith(NULL_EXTRA_PREFIX)}
    return Inversion(
        prompt=record["prompt"],
        meta=record["meta"],
        **{k: tensors[k] for k in TENSOR_FIELDS},
        **optional,
        null_extra=extra,
    )


def _header_record(data: bytes, label: str) -> dict[str, Any]:
    """The nti_lightning record in a safetensors header: 8 bytes little-endian length, then JSON."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    try:
        header = json.loads(data[8 : 8 + n]) if 0 <= n <= len(data) - 8 else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise InvalidInversionError(f"{label}: not a readable inversion file (its header does not read); {FIX_DAMAGED}")
    metadata = header.get("__metadata__") or {}
    if "nti_lightning" not in metadata:
        raise ValueError(f"{label} is a safetensors file but not an nti_lightning inversion")
    try:
        return json.loads(metadata["nti_lightning"])
    except ValueError as e:
        raise InvalidInversionError(f"{label}: not a readable inversion file ({e}); {FIX_DAMAGED}") from e


def save_inversion(
    path: str | os.PathLike,
    inv: Inversion,
    codec: str = DEFAULT_CODEC,
    tmp_dir: Path | None = None,
    level: int = ZSTD_LEVEL,
) -> Path:
    """Writes ``inv`` to ``path`` (.safetensors added if missing), atomically (``store.files.atomic_write``;
    ``tmp_dir``: a run worker's temporary folder), ∅_t through ``codec`` (default: ``DEFAULT_CODEC``,
    docs/storage.md; "fp32" the format-1 file, ``LOSSLESS_CODEC`` exact) at zstd ``level``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
    return atomic_write(path, inversion_to_bytes(inv, codec, label=str(path), level=level), tmp_dir)


def load_inversion(path: str | os.PathLike, model=None) -> Inversion:
    """Reads an inversion (format 1 or 2) and checks it (``validate_record``): shapes, dtypes, finite values and
    meta; with ``model`` given, also that it fits and was made with that model and scheduler. Raises
    ``InvalidInversionError`` / ``IncompatibleInversionError`` (one line naming the file) before any work."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"inversion file {path} does not exist")
    inv = inversion_from_bytes(path.read_bytes(), label=str(path))
    validate_record(inv, model, label=str(path))
    return inv


def validate_record(inv: Inversion, model=None, label: str = "inversion") -> None:
    """Every check of a record before it is used (``store/validate.py``): its tensors (ranks, dtypes, agreeing
    shapes, finite values) and meta (an object with the keys every record has; a nulled identity is refused as
    unverifiable); with ``model``, that it was made with it (``check_compatible``: the message of another model's
    record says which to load) and fits it (latent channels, VAE factor, a bounded size, the null's shapes,
    timesteps)."""
    check_tensors(inv, label)
    check_meta(inv, label)
    if model is not None:
        check_compatible(inv, model, label)
        check_model(inv, model, label)


SCHEDULER_IDENTITY_KEYS = (
    "beta_start",
    "beta_end",
    "beta_schedule",
    "num_train_timesteps",
    "set_alpha_to_one",
    "steps_offset",
    "prediction_type",
    "timestep_spacing",
)
"""Scheduler options that change the DDIM trajectory; records made before prediction_type and
timestep_spacing were recorded are compared on the keys they have."""


def scheduler_identity(scheduler) -> dict[str, Any]:
    config = scheduler.config
    defaults = {"prediction_type": "epsilon", "timestep_spacing": "leading"}
    return {k: config.get(k, defaults.get(k)) for k in SCHEDULER_IDENTITY_KEYS}


def check_compatible(inv: Inversion, model, label: str = "inversion") -> None:
    """Raises ``IncompatibleInversionError`` if ``model`` is not the model/scheduler that made ``inv``.

    The family and prediction type are checked first (a v-prediction inversion replayed by an ε model — or
    the reverse — would read its null embeddings as the wrong quantity), then the weights' fingerprint, then
    the scheduler options."""
    family = getattr(model, "family", None)
    made_family, made_pt = inv.meta.get("family"), inv.meta.get("prediction_type")
    if family is not None and (
        (made_family is not None and made_family != family.name)
        or (made_pt is not None and made_pt != family.prediction_type)
    ):
        raise IncompatibleInversionError(
            f"{label} was made with model family {made_family} ({made_pt}, {inv.meta.get('model_source')!r}) "
            f"but the model given is family {family.name} ({family.prediction_type}, {model.source!r}); "
            "an inversion only reconstructs with the model family and weights that made it. Load that model."
        )
    made_with = inv.meta.get("model_fingerprint")
    if made_with is not None and made_with != model.fingerprint:
        raise IncompatibleInversionError(
            f"{label} was made with model {inv.meta.get('model_source')!r} (fingerprint {made_with}) but the "
            f"model given is {model.source!r} (fingerprint {model.fingerprint}); its null embeddings only "
            "reconstruct the image with the model that optimised them. Load that model instead."
        )
    sched = inv.meta.get("scheduler")
    now = scheduler_identity(model.scheduler)
    if sched is not None and any(sched[k] != now.get(k) for k in sched):
        raise IncompatibleInversionError(
            f"{label} was made with scheduler {sched} but the model's scheduler is "
            f"{ {k: now.get(k) for k in sched} }; use the scheduler the inversion was made with."
        )
