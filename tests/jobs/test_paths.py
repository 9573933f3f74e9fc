"""One rule for the model paths every job writes into its config.yaml (``jobs.paths``)."""

from __future__ import annotations

from dataclasses import replace

from nti_lightning.config import ModelConfig
from nti_lightning.jobs.edit_config import EditModelConfig
from nti_lightning.jobs.paths import absolute_model


def test_local_model_paths_become_absolute_and_embedded_names_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # a folder that happens to be named like the embedded model
    (tmp_path / "ckpt.safetensors").write_bytes(b"")
    (tmp_path / "configs").mkdir()
    for cfg in (ModelConfig(), EditModelConfig()):
        local = absolute_model(replace(cfg, spec="ckpt.safetensors", config_dir="configs"))
        assert (local.spec, local.config_dir) == (str(tmp_path / "ckpt.safetensors"), str(tmp_path / "configs"))
        named = absolute_model(replace(cfg, spec="tiny", config_dir="tiny-sd2-v"))
        assert (named.spec, named.config_dir) == ("tiny", "tiny-sd2-v")
        hub = absolute_model(replace(cfg, spec="org/some-model", config_dir=None))
        assert (hub.spec, hub.config_dir) == ("org/some-model", None)
