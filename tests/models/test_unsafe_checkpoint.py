"""A ``.ckpt`` whose pickle would run code is refused by torch.load(weights_only=True); the message says so (it
used to tell the user to "pass config_dir=" although they had)."""

from __future__ import annotations

import os

import pytest
import torch

from nti_lightning import load_model
from nti_lightning.cli import main
from nti_lightning.models.detect import ModelFolderError


class _RunsCode:
    """Unpickling this calls os.mkdir(path): the marker folder exists only if the pickle's code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture()
def evil_ckpt(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": _RunsCode(tmp_path / "code_ran")}}, path)
    return path


@pytest.mark.parametrize("config_dir", ["tiny", None])
def test_a_pickle_that_runs_code_is_refused_as_unsafe(evil_ckpt, config_dir):
    with pytest.raises(ModelFolderError) as info:
        load_model(str(evil_ckpt), config_dir=config_dir)
    message = str(info.value)
    assert message.startswith(f"checkpoint {evil_ckpt} was refused as unsafe to unpickle")
    assert "mkdir" in message and "config_dir" not in message and "\n" not in message
    assert not (evil_ckpt.parent / "code_ran").exists()


def test_nti_invert_on_an_unsafe_checkpoint_exits_2_with_one_line(evil_ckpt, tmp_path, capsys):
    assert main(["invert", "--model", str(evil_ckpt), "model.config_dir=tiny", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused as unsafe to unpickle" in err and "pass config_dir" not in err
    assert not (tmp_path / "code_ran").exists()
