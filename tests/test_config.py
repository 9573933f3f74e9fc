from pathlib import Path

import pytest

from nti_lightning.config import ConfigError, InversionConfig, RunConfig, apply_overrides, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_are_the_authors():
    c = InversionConfig()
    assert (c.num_ddim_steps, c.guidance_scale, c.num_inner_steps) == (50, 7.5, 10)
    assert (c.learning_rate, c.lr_decay_horizon, c.early_stop_epsilon, c.early_stop_slope) == (1e-2, 100, 1e-5, 2e-5)
    assert c.early_stop and c.batch_size == "auto" and c.slots is None


def test_batch_size_auto_and_bad_values():
    from nti_lightning.config import CPU_BATCH_SIZE, resolve_batch_size

    assert resolve_batch_size("auto") == CPU_BATCH_SIZE == 8 and resolve_batch_size(3) == 3
    for bad in ("inversion.batch_size=0", "inversion.batch_size=many", "inversion.learning_rate=0",
                "inversion.slots=0"):  # fmt: skip
        with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[1]):
            load_config(None, [bad])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"paper.yaml", "fast_cpu.yaml"} <= names


def test_paper_config_equals_defaults():
    assert load_config(Path(__file__).parent.parent / "configs" / "paper.yaml").inversion == InversionConfig()


def test_packaged_configs_load_by_name_and_are_the_checkouts():
    from nti_lightning.config import PACKAGED_CONFIGS, packaged_configs

    assert (Path(__file__).parent.parent / "configs").resolve() == PACKAGED_CONFIGS  # one copy, in the package
    assert {"paper", "fast_cpu", "sd2"} <= set(packaged_configs())
    assert load_config("paper") == load_config("paper.yaml") == load_config(PACKAGED_CONFIGS / "paper.yaml")
    assert load_config("fast_cpu").inversion != InversionConfig()
    with pytest.raises(ConfigError, match=r"papr does not exist \(packaged configs, usable by name: fast_cpu, paper"):
        load_config("papr")


def test_configs_are_package_data():
    """The wheel ships them: pyproject's package-data pattern matches every packaged YAML."""
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11

    from nti_lightning.config import PACKAGED_CONFIGS

    root = Path(__file__).parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "nti_lightning"
    ]
    shipped = {p for pat in patterns for p in (root / "nti_lightning").glob(pat)}
    assert set(PACKAGED_CONFIGS.glob("*.yaml")) <= {p.resolve() for p in shipped}


def test_overrides_merge_over_file():
    cfg = load_config(CONFIGS[0], ["inversion.num_inner_steps=3", "trainer.devices=2"])
    assert cfg.inversion.num_inner_steps == 3 and cfg.trainer.devices == 2


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="num_inner_stepz"):
        load_config(None, ["inversion.num_inner_stepz=3"])


def test_wrong_type_and_bad_value():
    with pytest.raises(ConfigError, match="num_inner_steps"):
        load_config(None, ["inversion.num_inner_steps=many"])
    with pytest.raises(ConfigError, match="lr_decay_horizon"):
        load_config(None, ["inversion.num_ddim_steps=150"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["inversion.num_inner_steps"])


def test_shard_and_codec_level_settings_are_checked():
    for bad, name in (("output.codec_level=0", "codec_level"), ("output.codec_level=23", "codec_level"),
                      ("output.shard_min_images=0", "shard_min_images"),
                      ("output.shard_min_images=20000", "shard_min_images")):  # fmt: skip
        with pytest.raises(ConfigError, match=name):
            load_config(None, [bad])
    o = load_config(None, ["output.codec_level=19", "output.shard_min_images=10"]).output
    assert (o.codec_level, o.shard_min_images) == (19, 10)


def test_api_overrides():
    c = apply_overrides(InversionConfig(), num_inner_steps=2, batch_size=4)
    assert c.num_inner_steps == 2 and c.batch_size == 4 and c.num_ddim_steps == 50
    with pytest.raises(ConfigError, match="num_steps"):
        apply_overrides(InversionConfig(), num_steps=3)


def test_auto_precision_resolves_per_device(monkeypatch):
    import torch

    from nti_lightning.engine.runtime import resolve_precision

    assert RunConfig().trainer.precision == "auto"
    assert resolve_precision("16-mixed", "cuda") == "16-mixed"  # an explicit choice is kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "auto") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("auto", "cpu") == "32-true"  # CUDA present but CPU asked for
    for bf16 in (True, False):  # fp16 on every CUDA GPU: bf16 loses > 0.5 dB on the tiny model (docs/scaleout.md)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, v=bf16: v)
        assert resolve_precision("auto", "auto") == resolve_precision("auto", "gpu") == "16-mixed"
