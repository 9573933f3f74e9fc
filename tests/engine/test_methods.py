"""The inverters besides NTI (ddim, npi, proxnpi, direct) on the one slot engine: records, calls, reconstruction."""

import json

import pytest
import torch

from nti_lightning import invert, load_inversion, save_inversion
from nti_lightning.api import reconstruction_latents
from nti_lightning.config import ConfigError, InversionConfig, load_config
from nti_lightning.data.image import prepare_image
from nti_lightning.engine.slots import Admission, Finished, SlotEngine
from nti_lightning.p2p import edit
from nti_lightning.store.codec_names import LOSSLESS_CODEC

PROMPT, TARGET = "a red ball on green grass", "a red apple on green grass"
FAST = dict(num_ddim_steps=5)
METHODS4 = ("ddim", "nti", "npi", "direct")


@pytest.fixture(scope="module")
def image(sample_images):
    return sample_images[1]


@pytest.fixture(scope="module")
def records(tiny_model, image):
    """One record per method of the same image (tiny model, native size, T = 5)."""
    return {m: invert(tiny_model, [image], [PROMPT], method=m, **FAST)[0] for m in METHODS4}


def _engine_run(model, image, method, **kw):
    """Runs one image through a SlotEngine, recording whether grad was enabled at each UNet call."""
    engine = SlotEngine(model, InversionConfig(method=method, **FAST, **kw), rows=1)
    grad_at_call = []
    denoise = engine.denoise

    def counted(z, t, cond):
        grad_at_call.append(torch.is_grad_enabled())
        return denoise(z, t, cond)

    engine.denoise = counted
    [inv] = [
        e.inversion for e in engine.run([Admission(0, prepare_image(image, 128), PROMPT)]) if isinstance(e, Finished)
    ]
    return engine, grad_at_call, inv


@pytest.mark.parametrize("method", ["ddim", "npi", "proxnpi"])
def test_pivot_only_methods_make_no_call_with_grad(tiny_model, image, method):
    engine, grad_at_call, inv = _engine_run(tiny_model, image, method)
    T = FAST["num_ddim_steps"]
    assert engine.calls["grad"] == 0 and engine.calls["no_grad"] == T
    assert len(grad_at_call) == T and not any(grad_at_call)
    assert inv.meta["unet_calls"] == {"pivot": T, "cond": 0, "uncond_grad": 0, "uncond": 0}
    assert int(inv.inner_steps.sum()) == 0 and inv.z_0 is None
    assert torch.equal(inv.z_T, inv.pivot_zT)
    null = tiny_model.family.encode_prompts(tiny_model, [PROMPT if method != "ddim" else ""])["prompt_embeds"][0]
    assert torch.allclose(inv.null_embeddings, null.expand_as(inv.null_embeddings).cpu())


def test_nti_makes_calls_with_grad_and_direct_none(tiny_model, image):
    engine, grad_at_call, _ = _engine_run(tiny_model, image, "nti", num_inner_steps=2, early_stop=False)
    assert engine.calls["grad"] == 2 * FAST["num_ddim_steps"] and sum(grad_at_call) == engine.calls["grad"]
    engine, grad_at_call, inv = _engine_run(tiny_model, image, "direct")
    assert engine.calls["grad"] == 0 and not any(grad_at_call) and len(grad_at_call) == 3 * FAST["num_ddim_steps"]


def test_direct_reconstructs_the_pivot_to_float_precision(tiny_model, records, tmp_path):
    inv = records["direct"]
    assert inv.corrections.shape == (FAST["num_ddim_steps"], *inv.z_T.shape)
    assert inv.corrections.abs().max() > 1e-2  # the corrections do something
    z0 = reconstruction_latents(tiny_model, [inv])[0].cpu()
    assert (z0 - inv.pivot_z0).abs().max() <= 1e-4
    loaded = load_inversion(save_inversion(tmp_path / "d", inv), tiny_model)
    assert (reconstruction_latents(tiny_model, [loaded])[0].cpu() - inv.pivot_z0).abs().max() <= 1e-4
    # the P2P source branch is corrected too; the target branch is not on the pivot
    result = edit(tiny_model, inv, TARGET)
    assert (result.latents[0] - inv.pivot_z0).abs().max() <= 1e-4
    assert (result.latents[1] - inv.pivot_z0).abs().max() > 1e-3


def test_nti_beats_ddim_on_reconstruction(tiny_model, records):
    err = {
        m: float((reconstruction_latents(tiny_model, [records[m]])[0].cpu() - records[m].pivot_z0).pow(2).mean())
        for m in ("ddim", "nti")
    }
    assert err["nti"] < 0.6 * err["ddim"], err  # T = 5 is coarse: 1.9× on the shipped tiny model


def test_proxnpi_reconstructs_as_npi_and_edits_with_proximal_guidance(tiny_model, image, records):
    prox = invert(tiny_model, [image], [PROMPT], method="proxnpi", **FAST)[0]
    npi = records["npi"]
    assert prox.meta["sampling"] == {
        "kind": "proximal", "operator": "l0", "quantile": 0.75, "recon_t": 400, "recon_lr": 1.0, "dilate": 1,
    }  # fmt: skip
    assert torch.equal(prox.trajectory[0], prox.pivot_z0) and torch.equal(prox.trajectory[-1], prox.pivot_zT)
    assert torch.equal(reconstruction_latents(tiny_model, [prox]), reconstruction_latents(tiny_model, [npi]))
    e_prox, e_npi = edit(tiny_model, prox, TARGET).latents, edit(tiny_model, npi, TARGET).latents
    assert (e_prox[1] - e_npi[1]).abs().max() > 1e-3  # the proximal step and inversion guidance act on the edit


@pytest.mark.parametrize("method", ["ddim", "nti", "npi", "direct"])
def test_method_is_recorded_and_round_trips(tiny_model, records, method, tmp_path):
    inv = records[method]
    assert inv.method == method and inv.meta["hyperparameters"]["method"] == method
    loaded = load_inversion(save_inversion(tmp_path / method, inv, codec=LOSSLESS_CODEC), tiny_model)
    assert loaded.method == method and loaded.meta == inv.meta
    for name in ("z_T", "null_embeddings", "trajectory", "corrections"):
        a, b = getattr(inv, name), getattr(loaded, name)
        assert (a is None and b is None) or torch.equal(a, b), name


def test_nti_is_the_default_and_records_without_method_read_as_nti(tiny_model, records, tmp_path):
    assert InversionConfig().method == "nti" and records["nti"].meta["method"] == "nti"
    inv = records["nti"]
    inv_old = type(inv)(**{**inv.__dict__, "meta": {k: v for k, v in inv.meta.items() if k != "method"}})
    assert load_inversion(save_inversion(tmp_path / "old", inv_old)).method == "nti"


def test_invalid_method_is_a_clear_error(tiny_model, image):
    with pytest.raises(ValueError, match=r"inversion.method='edict' must be one of ddim, nti, npi, proxnpi, direct"):
        invert(tiny_model, [image], [PROMPT], method="edict")
    with pytest.raises(ConfigError, match="ddim, nti, npi, proxnpi, direct"):
        load_config(overrides=["inversion.method=foo"])


def test_nti_invert_cli_with_another_method(tmp_path, sample_images):
    from PIL import Image

    from nti_lightning.cli import main

    for k, im in enumerate(sample_images[:2]):
        Image.fromarray(im).save(tmp_path / f"im{k}.png")
    out = tmp_path / "out"
    rc = main(["invert", "--images", str(tmp_path), "--output", str(out), "--quiet", "inversion.method=direct",
               "inversion.num_ddim_steps=3", "data.default_prompt=a photo", "output.logger=none"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"direct"} and all("direct" in r["metrics"] for r in rows)
    inv = load_inversion(out / rows[0]["paths"]["inversion"])
    assert inv.method == "direct" and inv.corrections is not None
    assert json.loads((out / "run.json").read_text())["inversion"]["method"] == "direct"


def test_direct_resumes_from_an_engine_checkpoint_bit_for_bit(tiny_model, image, records):
    cfg = InversionConfig(method="direct", **FAST)
    adm = [Admission(0, prepare_image(image, 128), PROMPT)]
    engine = SlotEngine(tiny_model, cfg, rows=1)
    for ev in engine.run(adm):
        if getattr(ev, "number", None) == 8:  # mid-way through the corrections (after the 5 pivot steps)
            state = engine.state_dict()
            break
    resumed = SlotEngine(tiny_model, cfg, rows=1)
    resumed.load_state_dict(state)
    [inv] = [e.inversion for e in resumed.run(iter(())) if isinstance(e, Finished)]
    ref = records["direct"]
    assert torch.equal(inv.corrections, ref.corrections) and torch.equal(inv.z_0, ref.z_0)
