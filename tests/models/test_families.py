"""Model families (issue #16): detection from folders and configs, scheduler options honoured or refused, bad
folders and wrong-family inversions as clear errors, and the external oracles: our sampler against diffusers'
``StableDiffusionPipeline`` and our inverse step against ``DDIMInverseScheduler``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from oracles import sampler_and_pipeline

from nti_lightning.engine.ddim import ddim_inverse_step, ddim_step, schedule_from_scheduler
from nti_lightning.engine.sampling import ddim_inversion, unet_denoiser
from nti_lightning.models import load_model, model_from_components
from nti_lightning.models.detect import ModelFolderError, UnsupportedSchedulerError
from nti_lightning.models.tiny import SCHEDULER_CONFIG, build_random_family_components
from nti_lightning.store.inversion import IncompatibleInversionError, check_compatible

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: one intra-op thread


@pytest.fixture(scope="module")
def sd2_random():
    return model_from_components(**build_random_family_components("sd2", 0), source="tiny-sd2-random")


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory, sd2_random):
    d = tmp_path_factory.mktemp("sd2")
    sd2_random.pipeline.save_pretrained(d)
    return d


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------


def test_families_are_detected(tiny_model, sd2_random, sd2_dir):
    assert tiny_model.family.name == "sd1" and tiny_model.prediction_type == "epsilon"
    assert not tiny_model.family.attention.linear_projection and tiny_model.family.attention.heads == (2,) * 4
    fam = sd2_random.family
    assert (fam.name, fam.prediction_type, fam.native_image_size, fam.scaling_factor) == (
        "sd2-v",
        "v_prediction",
        128,
        0.18215,
    )
    assert fam.attention.linear_projection and fam.attention.text_width == 48 and fam.attention.heads == (2, 4, 8, 8)
    loaded = load_model(sd2_dir)
    assert loaded.family == fam and loaded.fingerprint == sd2_random.fingerprint
    assert loaded.tokenizer.pad_token == "!" and loaded.tokenizer.pad_token != loaded.tokenizer.eos_token


def test_sd2_epsilon_is_its_own_family(tmp_path, sd2_dir):
    d = tmp_path / "sd2-base"
    shutil.copytree(sd2_dir, d)
    _edit_json(d / "scheduler" / "scheduler_config.json", prediction_type="epsilon")
    model = load_model(d)
    assert model.family.name == "sd2" and model.scheduler.config.prediction_type == "epsilon"


def test_scheduler_options_are_honoured():
    comps = build_random_family_components("sd2", 0)
    options = dict(prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0)
    comps["scheduler"] = DDIMScheduler(**{**SCHEDULER_CONFIG, **options})
    model = model_from_components(**comps)
    cfg = model.scheduler.config
    assert (cfg.timestep_spacing, cfg.set_alpha_to_one, cfg.steps_offset) == ("trailing", True, 0)
    s = schedule_from_scheduler(model.scheduler, 20)
    assert s.timesteps[0] == 999 and s.timesteps[-1] == 49 and float(s.final_alpha_cumprod) == 1.0


@pytest.mark.parametrize(
    "option, words",
    [
        ({"rescale_betas_zero_snr": True}, "zero terminal snr"),
        ({"prediction_type": "sample"}, "prediction_type='sample'"),
        ({"thresholding": True}, "thresholding"),
    ],
)
def test_unsupported_scheduler_options_are_refused(tmp_path, sd2_dir, option, words):
    d = tmp_path / "m"
    shutil.copytree(sd2_dir, d)
    _edit_json(d / "scheduler" / "scheduler_config.json", **option)
    with pytest.raises(UnsupportedSchedulerError) as e:
        load_model(d)
    assert words in str(e.value).lower()


def test_bad_folders_are_clear_errors(tmp_path, sd2_dir):
    with pytest.raises(ModelFolderError, match="model_index.json"):
        load_model(tmp_path)  # an empty folder
    bad = tmp_path / "bad"
    shutil.copytree(sd2_dir, bad)
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        load_model(bad)
    _edit_json_text = {"_class_name": "StableDiffusionXLPipeline"}
    (bad / "model_index.json").write_text(json.dumps(_edit_json_text))
    with pytest.raises(ModelFolderError, match="needs a 'text_time' UNet"):  # an SDXL index over an SD2 UNet
        load_model(bad)
    shutil.copy(sd2_dir / "model_index.json", bad / "model_index.json")
    (bad / "unet" / "config.json").unlink()
    with pytest.raises(ModelFolderError, match="unet/config.json"):
        load_model(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


def test_inpainting_unet_is_refused(tmp_path, sd2_dir):
    d = tmp_path / "inpaint"
    shutil.copytree(sd2_dir, d)
    _edit_json(d / "unet" / "config.json", in_channels=9)
    with pytest.raises(ModelFolderError, match="9 input channels"):
        load_model(d)


def test_wrong_family_inversion_is_a_clear_error(tiny_model, sd2_random):
    from nti_lightning import invert

    img = torch.rand(3, 64, 64).mul(255).byte().permute(1, 2, 0).numpy()
    inv = invert(sd2_random, [img], ["a photo of a cat"], num_ddim_steps=2, num_inner_steps=1, image_size=64)[0]
    assert (inv.meta["family"], inv.meta["prediction_type"]) == ("sd2-v", "v_prediction")
    check_compatible(inv, sd2_random)
    with pytest.raises(IncompatibleInversionError, match="family sd2-v .v_prediction.*family sd1 .epsilon"):
        check_compatible(inv, tiny_model)


# ---------------------------------------------------------------------------------------------------------
# External oracles
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["tiny", "tiny-sd2-v"])
def test_sampler_equals_stable_diffusion_pipeline(spec):
    """Every ∅_t = the model's null: our guided DDIM sampler from z_T is diffusers' pipeline at w = 7.5."""
    model = load_model(spec)
    T, prompt = 10, "a photo of a cat"
    ours, theirs = sampler_and_pipeline(model, T, prompt)
    assert (ours - theirs).abs().max().item() <= 1e-5


INVERSE_CASES = [
    dict(prediction_type="epsilon"),
    dict(prediction_type="v_prediction"),
    dict(prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0),
    dict(prediction_type="epsilon", set_alpha_to_one=True, steps_offset=0),
]


@pytest.mark.parametrize("options", INVERSE_CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_inverse_step_equals_ddim_inverse_scheduler(options):
    config = {**SCHEDULER_CONFIG, **options}
    T = 20
    schedule = schedule_from_scheduler(DDIMScheduler(**config), T)
    inverse = DDIMInverseScheduler(**config)
    inverse.set_timesteps(T)
    assert torch.equal(inverse.timesteps, schedule.timesteps.flip(0))
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 8, 8, generator=g)
    for t in inverse.timesteps.tolist():
        out = torch.randn(2, 4, 8, 8, generator=g)
        expected = inverse.step(out, t, z).prev_sample
        ours = ddim_inverse_step(schedule, z, out, t)
        assert (ours - expected).abs().max().item() <= 1e-6
        z = expected


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_v_sampling_step_equals_ddim_scheduler(spacing):
    config = {**SCHEDULER_CONFIG, "prediction_type": "v_prediction", "timestep_spacing": spacing}
    sched = DDIMScheduler(**config)
    schedule = schedule_from_scheduler(DDIMScheduler(**config), 20)
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 8, 8, generator=g)
    for t in sched.timesteps.tolist():
        v = torch.randn(1, 4, 8, 8, generator=g)
        assert torch.equal(ddim_step(schedule, z, v, t), sched.step(v, t, z, eta=0.0).prev_sample)
        z = sched.step(v, t, z, eta=0.0).prev_sample


def test_v_inversion_equals_a_diffusers_inverse_loop(sd2_random):
    """The whole pivot (Algorithm 1, line 4) of a v model: ours against DDIMInverseScheduler stepping the UNet."""
    model, T = sd2_random, 5
    schedule = schedule_from_scheduler(model.scheduler, T)
    inverse = DDIMInverseScheduler.from_config(model.scheduler.config)
    inverse.set_timesteps(T)
    cond = model.family.encode_prompts(model, ["a photo of a cat"])
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ours = ddim_inversion(unet_denoiser(model.unet, model.family), schedule, z, cond)[-1]
    with torch.no_grad():
        for t in inverse.timesteps:
            z = inverse.step(model.unet(z, t, cond["prompt_embeds"]).sample, t, z).prev_sample
    assert (ours - z).abs().max().item() <= 1e-5


def test_nti_invert_with_model_flag_on_an_sd2_folder(tmp_path, sd2_dir):
    """`nti invert --model <sd2 folder>` as a diffusers user expects: the family is detected and recorded."""
    from PIL import Image

    from nti_lightning import load_inversion
    from nti_lightning.cli import main

    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "red.png")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "red.png", "prompt": "a red wall"}) + "\n")
    out = tmp_path / "out"
    argv = ["invert", "--images", str(tmp_path / "red.png"), "--captions", str(tmp_path / "captions.jsonl")]
    argv += ["--output", str(out), "--model", str(sd2_dir), "inversion.num_ddim_steps=2"]
    argv += ["inversion.num_inner_steps=1", "inversion.image_size=64", "--quiet"]
    assert main(argv) == 0
    rec = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    inv = load_inversion(out / rec["paths"]["inversion"], model=load_model(sd2_dir))
    assert (inv.meta["family"], inv.meta["prediction_type"]) == ("sd2-v", "v_prediction")


def test_a_hub_id_is_fetched_as_a_folder_and_detected_like_one(monkeypatch):
    """A hub id goes through one snapshot of its diffusers files, then the folder path: SDXL is detected too."""
    import huggingface_hub

    from nti_lightning.models.loading import EMBEDDED, HUB_FILES, ModelNotFoundError

    asked = []

    def snapshot(repo_id, allow_patterns):
        asked.append((repo_id, tuple(allow_patterns)))
        return str(EMBEDDED["tiny-sdxl"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    model = load_model("someone/sdxl-model")
    assert asked == [("someone/sdxl-model", HUB_FILES)]
    assert model.family.name == "sdxl" and model.source == "someone/sdxl-model"

    def offline(repo_id, allow_patterns):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError, match=r"'someone/x'.*OSError: no network.*pass its local folder"):
        load_model("someone/x")
