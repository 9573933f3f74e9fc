"""Single-file (original LDM layout) SD1.x / SD2.x / SDXL checkpoints with a config folder: ``load_model(file,
config_dir=folder)`` gives the folder's model, bad input gives one clear error, and ``nti invert`` / ``nti edit`` /
``nti eval`` run on such a file offline (the config folder is recorded with the inversion)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from single_file import copy_configs, write_single_file

from nti_lightning import load_inversion, load_model
from nti_lightning.cli import main
from nti_lightning.eval.report import read_records
from nti_lightning.models import model_from_components
from nti_lightning.models.detect import ModelFolderError
from nti_lightning.models.loading import EMBEDDED
from nti_lightning.models.single_file import check_checkpoint_matches, check_sdxl_checkpoint_matches
from nti_lightning.models.tiny import build_random_family_components
from nti_lightning.p2p.cli import model_args_for

pytestmark = pytest.mark.usefixtures("one_thread")  # 2 threads on a busy 2-core machine: 10x slower UNet calls

FAMILIES = {"tiny": ("sd1", "epsilon"), "tiny-sd2-v": ("sd2-v", "v_prediction"), "tiny-sdxl": ("sdxl", "epsilon")}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name → (the folder's model, its single-file checkpoint, a copy of its folder without weight files)."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for name in FAMILIES:
        model = load_model(name)
        path = write_single_file(model, root / f"{name}.safetensors")
        out[name] = (model, path, copy_configs(EMBEDDED[name], root / f"{name}-configs"))
    return out


def unet_out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    cond = model.family.encode_prompts(model, ["a red wall"])
    with torch.no_grad():
        return model.unet(z, torch.tensor(501), **model.family.unet_kwargs(cond)).sample


@pytest.mark.parametrize("name", list(FAMILIES))
def test_single_file_loads_as_its_folder(converted, name):
    folder_model, path, configs = converted[name]
    model = load_model(path, config_dir=configs)  # configs only: every weight comes from the file
    assert (model.family.name, model.prediction_type) == FAMILIES[name]
    assert model.family == folder_model.family
    assert model.fingerprint == folder_model.fingerprint
    assert model.config_dir == str(configs.resolve()) and model.source == str(path.resolve())
    assert (unet_out(model) - unet_out(folder_model)).abs().max().item() <= 1e-6
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        diff = model.vae.encode(x).latent_dist.mean - folder_model.vae.encode(x).latent_dist.mean
    assert diff.abs().max().item() <= 1e-6


def text_outs(model) -> list[torch.Tensor]:
    """Both SDXL text encoders on one prompt: each one's hidden states, and the second's projected pooled output."""
    ids = model.tokenizer(["a red wall"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        first = model.text_encoder(ids, output_hidden_states=True)
        second = model.text_encoder_2(ids, output_hidden_states=True)
    return [*first.hidden_states, *second.hidden_states, second.text_embeds]


def assert_same_outputs(model, other):
    assert (unet_out(model) - unet_out(other)).abs().max().item() <= 1e-6
    for a, b in zip(text_outs(model), text_outs(other), strict=True):
        assert (a - b).abs().max().item() <= 1e-6


def test_sdxl_single_file_loads_both_text_encoders(converted):
    """SDXL: the UNet (add-embedding as label_emb), the CLIP encoder (conditioner.embedders.0) and the OpenCLIP one
    (conditioner.embedders.1, fused in_proj, text_projection) all come from the file. The tiny SDXL's two encoders
    are equally wide, where diffusers' from_single_file alone would read the CLIP one into both."""
    folder_model, path, configs = converted["tiny-sdxl"]
    model = load_model(path, config_dir=configs)
    assert model.text_encoder_2 is not None and model.tokenizer_2 is not None
    assert type(model.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert model.family.force_zeros_for_empty_prompt == folder_model.family.force_zeros_for_empty_prompt
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(model, name).state_dict(), getattr(folder_model, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert_same_outputs(model, folder_model)


def test_sdxl_weights_are_the_files(tmp_path):
    """Random SDXL weights in the file, the trained tiny SDXL folder (weights and all) as config_dir: the file wins."""
    comps = build_random_family_components("sdxl", 5)
    random_sdxl = model_from_components(**comps, source="tiny-sdxl-random", force_zeros_for_empty_prompt=False)
    path = write_single_file(random_sdxl, tmp_path / "random-sdxl.safetensors")
    model = load_model(path, config_dir="tiny-sdxl")
    assert model.fingerprint == random_sdxl.fingerprint != load_model("tiny-sdxl").fingerprint
    assert model.config_dir == "tiny-sdxl"
    assert_same_outputs(model, random_sdxl)


def test_sdxl_file_or_config_dir_mismatch_is_one_clear_error(converted, tmp_path):
    _, sdxl_file, sdxl_configs = converted["tiny-sdxl"]
    _, sd1_file, sd1_configs = converted["tiny"]
    with pytest.raises(ModelFolderError, match=r"is an SD1\.x / SD2\.x checkpoint .* is an SDXL folder; config_dir"):
        load_model(sd1_file, config_dir=sdxl_configs)
    with pytest.raises(ModelFolderError, match=r"is an SDXL checkpoint .* is an SD1\.x / SD2\.x folder; config_dir"):
        load_model(sdxl_file, config_dir=sd1_configs)
    tensors = load_file(str(sdxl_file))
    no_second = {k: v for k, v in tensors.items() if not k.startswith("conditioner.embedders.1.")}
    save_file(no_second, str(tmp_path / "no_te2.safetensors"))
    with pytest.raises(ModelFolderError, match=r"has no OpenCLIP text encoder \(text_encoder_2\) weights"):
        load_model(tmp_path / "no_te2.safetensors", config_dir=sdxl_configs)
    deeper = copy_configs(sdxl_configs, tmp_path / "deeper")  # the folder says 3 layers, the file holds 2
    cfg = json.loads((deeper / "text_encoder_2" / "config.json").read_text())
    (deeper / "text_encoder_2" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ModelFolderError, match=r"text_encoder_2 layers is 2 but .*num_hidden_layers say 3; config_dir"):
        load_model(sdxl_file, config_dir=deeper)
    wider = copy_configs(sdxl_configs, tmp_path / "wider")
    cfg = json.loads((wider / "unet" / "config.json").read_text())
    (wider / "unet" / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 96}))
    with pytest.raises(ModelFolderError, match=r"UNet text width \(attn2\.to_k input\) is 64 but .* say 96"):
        load_model(sdxl_file, config_dir=wider)


def test_the_weights_are_the_files(tmp_path, random_model):
    """Random weights in the file, the trained tiny model's folder (weights and all) as config_dir: the file wins;
    an embedded name works as config_dir and is recorded by name."""
    path = write_single_file(random_model, tmp_path / "random.safetensors")
    model = load_model(path, config_dir="tiny")
    assert model.fingerprint == random_model.fingerprint != load_model("tiny").fingerprint
    assert model.config_dir == "tiny"
    assert (unet_out(model) - unet_out(random_model)).abs().max().item() <= 1e-6


def test_bad_file_or_config_dir_is_one_clear_error(converted, tmp_path):
    _, sd1_file, sd1_configs = converted["tiny"]
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope\.safetensors does not exist"):
        load_model(tmp_path / "nope.safetensors", config_dir=sd1_configs)
    with pytest.raises(ModelFolderError, match=r"config_dir .*missing .* has no model_index\.json"):
        load_model(sd1_file, config_dir=tmp_path / "missing")
    sd2_configs = converted["tiny-sd2-v"][2]
    with pytest.raises(ModelFolderError, match=r"reads text of width 32 .* cross_attention_dim 48; config_dir must"):
        load_model(sd1_file, config_dir=sd2_configs)
    no_text = {k: v for k, v in load_file(str(sd1_file)).items() if not k.startswith("cond_stage_model.")}
    save_file(no_text, str(tmp_path / "unet_vae.safetensors"))
    with pytest.raises(ModelFolderError, match=r"has no text encoder weights \(cond_stage_model\.\*\)"):
        load_model(tmp_path / "unet_vae.safetensors", config_dir=sd1_configs)


def test_invert_with_a_wrong_config_dir_exits_2_with_the_fix(converted, tmp_path, capsys):
    _, path, _ = converted["tiny"]
    argv = ["invert", "--output", str(tmp_path / "out"), "--model", str(path), f"model.config_dir={tmp_path}"]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"config_dir {tmp_path} for checkpoint {path}" in err and "has no model_index.json" in err


def test_text_encoder_layout_must_be_the_folders():
    """An OpenCLIP (SD2) text encoder with an SD1 folder (same widths): refused before any weight is read."""
    shapes = {"model.diffusion_model.x": (1,), "first_stage_model.x": (1,), "cond_stage_model.model.x": (1,)}
    shapes["cond_stage_model.model.token_embedding.weight"] = (1280, 32)
    with pytest.raises(ModelFolderError, match=r"is an SD2\.x .* checkpoint but cfg is an SD1\.x"):
        check_checkpoint_matches(shapes, {"cross_attention_dim": 32}, "f.safetensors", "cfg")


def test_sdxl_refiner_layout_is_refused():
    """An SDXL refiner file (only an OpenCLIP encoder, under conditioner.embedders.0.model) with a base folder."""
    shapes = {"model.diffusion_model.x": (1,), "first_stage_model.x": (1,)}
    shapes["conditioner.embedders.0.model.text_projection"] = (1280, 1280)
    with pytest.raises(ModelFolderError, match=r"has no CLIP text encoder \(text_encoder\) weights"):
        check_sdxl_checkpoint_matches(shapes, {}, "f.safetensors", "cfg")


def test_edit_takes_the_model_from_the_record_unless_given():
    meta = {"model_source": "/m/sd2.safetensors", "model_config_dir": "/m/sd2-configs"}
    assert model_args_for(meta, None, None) == ("/m/sd2.safetensors", "/m/sd2-configs")
    assert model_args_for(meta, "/n/x.safetensors", "/n/cfg") == ("/n/x.safetensors", "/n/cfg")
    assert model_args_for(meta, "/moved/sd2.safetensors", None) == ("/moved/sd2.safetensors", "/m/sd2-configs")
    assert model_args_for({"model_source": "tiny"}, None, None) == ("tiny", None)


@pytest.mark.parametrize("name", ["tiny-sd2-v", "tiny-sdxl"])
def test_invert_then_edit_a_single_file_checkpoint_offline(converted, tmp_path, capsys, name):
    """`nti invert --model file.safetensors model.config_dir=<folder>`, then `nti edit` with no --model; the same
    output folder refuses another config folder."""
    _, path, configs = converted[name]
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "red.png")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "red.png", "prompt": "a red wall"}) + "\n")
    out = tmp_path / "out"
    argv = ["invert", "--images", str(tmp_path / "red.png"), "--captions", str(tmp_path / "captions.jsonl")]
    argv += ["--output", str(out), "--model", str(path), f"model.config_dir={configs}", "--quiet"]
    argv += ["inversion.num_ddim_steps=2", "inversion.num_inner_steps=1", "inversion.image_size=64"]
    assert main(argv) == 0
    rec = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    inv_path = out / rec["paths"]["inversion"]
    meta = load_inversion(inv_path).meta
    assert (meta["family"], meta["prediction_type"]) == FAMILIES[name]
    assert (meta["model_source"], meta["model_config_dir"]) == (str(path.resolve()), str(configs.resolve()))

    assert main(["edit", str(inv_path), "--target", "a blue wall", "--device", "cpu"]) == 0
    edit = Image.open(inv_path.parent / "edits" / "a_blue_wall.png")
    assert edit.size == (64, 64)

    other = copy_configs(configs, tmp_path / "other-configs")  # same configs elsewhere: another run's folder
    argv[argv.index(f"model.config_dir={configs}")] = f"model.config_dir={other}"
    assert main(argv) == 2
    assert (
        f"model_config_dir: {str(configs.resolve())!r} there, {str(other.resolve())!r} now" in capsys.readouterr().err
    )


def test_eval_on_a_single_file_checkpoint(converted, tmp_path):
    """`nti eval --model file.safetensors --config-dir <folder>`: one PIE-format image, one method, offline."""
    _, path, configs = converted["tiny"]
    out = tmp_path / "ev"
    argv = ["eval", str(EMBEDDED["tiny"].parent / "pie_sample"), "--out", str(out), "--methods", "ddim"]
    argv += ["--limit", "1", "--steps", "2", "--no-strips", "--model", str(path), "--config-dir", str(configs)]
    assert main(argv) == 0
    assert json.loads((out / "run.json").read_text())["model_source"] == str(path.resolve())
    assert [r["method"] for r in read_records(out)] == ["ddim"]
