"""A damaged or hand-edited inversion file is refused before any work, with one line naming the file, what is
wrong and what to do (found by a hostile probe: NaN nulls gave an all-black image and exit 0; short nulls, a
3-channel z_T, a missing tensor, meta as a list or meta.scheduler as a string raised IndexError, KeyError or
TypeError; a (4, 256, 256) z_T tried to allocate 137 GB; nulling the fingerprint, family and scheduler skipped
every compatibility check)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nti_lightning import invert, reconstruct
from nti_lightning.cli import main
from nti_lightning.p2p import edit
from nti_lightning.store.inversion import (
    IncompatibleInversionError,
    InvalidInversionError,
    load_inversion,
    save_inversion,
)

T = 2


@pytest.fixture(scope="module")
def good(tiny_model, tmp_path_factory) -> Path:
    """A real record: the tiny model, 64 px, T = 2, N = 1, in the raw format (codec "fp32": its tensors are
    edited directly below; the encoded formats' damage is tested in test_codec.py)."""
    rng = np.random.default_rng(0)
    image = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    (inv,) = invert(tiny_model, [image], "a photo of a cat", num_ddim_steps=T, num_inner_steps=1, image_size=64)
    return save_inversion(tmp_path_factory.mktemp("good") / "inv", inv, codec="fp32")


def _read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["nti_lightning"])


def corrupt(good: Path, dst: Path, tensors=None, meta=None, record=None) -> Path:
    """A copy of ``good`` with its tensors / meta / whole record changed by the given functions, written with
    safetensors directly (``save_inversion`` would refuse it)."""
    t, rec = _read(good)
    if tensors is not None:
        t = tensors(t) or t
    if meta is not None:
        rec["meta"] = meta(rec["meta"])
    if record is not None:
        rec = record(rec)
    path = dst / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in t.items()}, str(path), metadata={"nti_lightning": json.dumps(rec)})
    return path


def _set(key, value):
    return lambda m: {**m, key: value}


def _latents(shape):
    return lambda t: {**t, **{k: torch.zeros(shape) for k in ("z_T", "pivot_z0", "pivot_zT")}}


def _nan_nulls(t):
    t["null_embeddings"][0, 0, 0] = float("nan")


CORRUPTIONS = {
    "nan_nulls": (dict(tensors=_nan_nulls), "null_embeddings holds 1 non-finite value(s)"),
    "short_nulls": (dict(tensors=lambda t: {**t, "null_embeddings": t["null_embeddings"][:1]}),
                    "timesteps has 2 steps but null_embeddings 1"),
    "z_T_3_channels": (dict(tensors=lambda t: {**t, "z_T": t["z_T"][:3]}),
                       "pivot_z0 has shape (4, 8, 8) but z_T (3, 8, 8)"),
    "missing_tensor": (dict(tensors=lambda t: {k: v for k, v in t.items() if k != "inner_steps"}),
                       "tensor(s) inner_steps missing"),
    "meta_list": (dict(meta=lambda m: list(m)), "its meta is a JSON list, not an object"),
    "scheduler_string": (dict(meta=_set("scheduler", "ddim")), "meta.scheduler is a JSON string, not object"),
    "hyperparameters_list": (dict(meta=_set("hyperparameters", [7.5])), "meta.hyperparameters is a JSON list"),
    "giant_z_T": (dict(tensors=_latents((4, 256, 256))), "z_T (4, 256, 256) does not fit meta.image_size 64 px"),
    "no_fingerprint": (dict(meta=_set("model_fingerprint", None)), "meta.model_fingerprint is null, so the record "
                       "cannot be checked against a model; records written by nti_lightning always have it"),
    "no_family": (dict(meta=_set("family", None)), "meta.family is null"),
    "no_scheduler": (dict(meta=lambda m: {k: v for k, v in m.items() if k != "scheduler"}),
                     "meta.scheduler is missing"),
    "no_image_size": (dict(meta=_set("image_size", None)), "meta.image_size is null"),
    "float_timesteps": (dict(tensors=lambda t: {**t, "timesteps": t["timesteps"].float()}),
                        "timesteps has dtype torch.float32, not an integer dtype"),
    "flat_nulls": (dict(tensors=lambda t: {**t, "null_embeddings": t["null_embeddings"][:, 0]}),
                   "null_embeddings has shape (2, 32), not 3 dimensions"),
    "inf_loss": (dict(tensors=lambda t: {**t, "final_loss": torch.full((T,), float("inf"))}), "final_loss holds inf"),
    "bad_trajectory": (dict(tensors=lambda t: {**t, "trajectory": torch.zeros(T, 4, 8, 8)}),
                       "trajectory has shape (2, 4, 8, 8), not (3, 4, 8, 8)"),
    "bad_corrections": (dict(tensors=lambda t: {**t, "corrections": torch.zeros(T, 4, 4, 4)}),
                        "corrections has shape (2, 4, 4, 4), not (2, 4, 8, 8)"),
    "record_list": (dict(record=lambda r: [r]), "its nti_lightning header is a JSON list, not an object"),
    "prompt_missing": (dict(record=lambda r: {k: v for k, v in r.items() if k != "prompt"}), "no prompt string"),
}  # fmt: skip
"""name → (how the good record is changed, what the one-line error says); all caught without the model."""

MODEL_CORRUPTIONS = {
    "all_latents_3_channels": (dict(tensors=_latents((3, 8, 8))), "z_T has 3 channels but the model's UNet takes 4"),
    "giant_consistent": (dict(tensors=_latents((4, 256, 256)), meta=_set("image_size", 2048)),
                         "meta.image_size 2048 px is over 4× the model's native 128 px"),
    "wrong_null_width": (dict(tensors=lambda t: {**t, "null_embeddings": torch.zeros(T, 77, 48)}),
                         "null_embeddings (2, 77, 48) do not match the model's null (T, (77, 32))"),
    "foreign_null_key": (dict(tensors=lambda t: {**t, "null_embeddings.text_embeds": torch.zeros(T, 32)}),
                         "null_embeddings.text_embeds is not a key of the model's null (prompt_embeds)"),
    "timesteps_out_of_schedule": (dict(tensors=lambda t: {**t, "timesteps": t["timesteps"] + 5000}),
                                  "timesteps are not 2 steps of the model's 1000-step schedule"),
}  # fmt: skip
"""Caught only against the model: the record is self-consistent but does not fit it."""


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_damaged_record_is_refused_with_one_line(good, tmp_path, tiny_model, name):
    how, says = CORRUPTIONS[name]
    path = corrupt(good, tmp_path, **how)
    for model in (None, tiny_model):
        with pytest.raises(InvalidInversionError) as info:
            load_inversion(path, model)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and says in message and "\n" not in message, message
        assert message.rstrip().endswith("invert the image again")


@pytest.mark.parametrize("name", sorted(MODEL_CORRUPTIONS))
def test_a_record_that_does_not_fit_the_model_is_refused(good, tmp_path, tiny_model, name):
    how, says = MODEL_CORRUPTIONS[name]
    path = corrupt(good, tmp_path, **how)
    load_inversion(path)  # self-consistent
    with pytest.raises(InvalidInversionError, match="invert the image again") as info:
        load_inversion(path, tiny_model)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"{path}: ") and says in str(info.value), str(info.value)


def test_the_good_record_and_the_oldest_format_load(good, tmp_path, tiny_model):
    inv = load_inversion(good, tiny_model)
    assert inv.num_steps == T and torch.isfinite(inv.null_embeddings).all()
    # records from before model families and methods: no family, prediction_type, method, sampling
    old_keys = ("family", "prediction_type", "method", "sampling", "model_config_dir", "precision")
    old = corrupt(good, tmp_path, meta=lambda m: {k: v for k, v in m.items() if k not in old_keys})
    assert load_inversion(old, tiny_model).method == "nti"
    largest = corrupt(good, tmp_path, tensors=_latents((4, 64, 64)), meta=_set("image_size", 512))  # 4x native
    assert load_inversion(largest, tiny_model).z_T.shape == (4, 64, 64)


def test_unreadable_header_is_one_line(good, tmp_path):
    t, rec = _read(good)
    path = tmp_path / "x.safetensors"
    save_file(t, str(path), metadata={"nti_lightning": "{not json"})
    with pytest.raises(InvalidInversionError, match=r"not a readable inversion file .*invert the image again"):
        load_inversion(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(InvalidInversionError, match=f"{path}: not a readable inversion file"):
        load_inversion(path)


def test_another_models_record_names_the_model_first(good, tmp_path, tiny_model):
    path = corrupt(good, tmp_path, meta=_set("model_fingerprint", "0123456789abcdef"))
    with pytest.raises(IncompatibleInversionError, match="fingerprint 0123456789abcdef"):
        load_inversion(path, tiny_model)


def test_in_memory_records_are_checked_by_reconstruct_and_edit(good, tiny_model):
    inv = load_inversion(good, tiny_model)
    inv.null_embeddings = inv.null_embeddings.clone()
    inv.null_embeddings[1] = float("nan")
    with pytest.raises(InvalidInversionError, match="inversion 0: null_embeddings holds"):
        reconstruct(tiny_model, inv)
    with pytest.raises(InvalidInversionError, match="null_embeddings holds"):
        edit(tiny_model, inv, "a photo of a dog")
    inv = load_inversion(good, tiny_model)
    inv.meta["scheduler"] = None
    with pytest.raises(InvalidInversionError, match="meta.scheduler is null"):
        reconstruct(tiny_model, inv)


def test_save_refuses_non_finite_results(good, tmp_path):
    inv = load_inversion(good)
    inv.z_T = inv.z_T.clone()
    inv.z_T[0, 0, 0] = float("inf")
    with pytest.raises(InvalidInversionError, match="z_T holds 1 non-finite value.*not saved"):
        save_inversion(tmp_path / "out", inv)
    assert not list(tmp_path.iterdir())
    inv = load_inversion(good)
    inv.final_loss = torch.tensor([float("nan"), 0.1])  # NaN: no inner step ran at that timestep
    inv.inner_steps = torch.tensor([0, 1])
    assert load_inversion(save_inversion(tmp_path / "ok", inv)).final_loss.isnan().tolist() == [True, False]
    inv.inner_steps = torch.tensor([1, 1])  # a NaN loss where steps ran is a failed optimisation
    with pytest.raises(InvalidInversionError, match="final_loss"):
        save_inversion(tmp_path / "nan", inv)


@pytest.mark.parametrize("name", ["nan_nulls", "meta_list", "scheduler_string", "giant_z_T", "no_fingerprint"])
def test_nti_edit_on_a_damaged_record_exits_2_with_one_line(good, tmp_path, capsys, name):
    path = corrupt(good, tmp_path, **CORRUPTIONS[name][0])
    assert main(["edit", str(path), "--target", "a photo of a dog", "--output", str(tmp_path / "edits")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"nti edit: {path}: ") and CORRUPTIONS[name][1] in line
    assert not (tmp_path / "edits").exists()


def test_nti_edit_on_a_record_that_does_not_fit_exits_2(good, tmp_path, capsys):
    path = corrupt(good, tmp_path, **MODEL_CORRUPTIONS["all_latents_3_channels"][0])
    assert main(["edit", str(path), "--target", "a photo of a dog", "--output", str(tmp_path / "edits")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"nti edit: {path}: z_T has 3 channels")
