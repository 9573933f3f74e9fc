"""``edit_config`` and ``edit_args``: EditConfig is the one home of ``nti edit``'s defaults; the help is plain
text and light (no torch)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import fields

import pytest

from nti_lightning.cli import build_parser, main, parse_command_line
from nti_lightning.edit_args import FLAG_KEYS, add_edit_subparser, config_from_args, parse_cross_replace
from nti_lightning.edit_config import EDIT_DEFAULTS, EditConfig


def parse(argv):
    parser = argparse.ArgumentParser(prog="nti")
    add_edit_subparser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def edit_help(capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["edit", "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_parser_defaults_are_edit_config_s():
    args = parse(["edit", "inv.safetensors", "--target", "a dog"])
    assert config_from_args(args) == EditConfig()
    for f in fields(EditConfig):  # one option per field, of the same name, setting its key only when given
        assert getattr(args, f.name) is None, f.name
        assert FLAG_KEYS.get(f.name, "edit.cross_replace") == f"edit.{f.name}"


def test_key_value_arguments_set_any_key_and_flags_win():
    def nti(*argv):
        return parse_command_line(build_parser(), ["edit", "x", "--target", "t", *argv])

    args = nti("edit.batch_size=2", "edit.cross_replace={default: 0.6, dog: 0.3}")
    assert config_from_args(args) == EditConfig(batch_size=2, cross_replace={"default_": 0.6, "dog": 0.3})
    assert config_from_args(nti("edit.batch_size=2", "--batch-size", "3")).batch_size == 3  # flags are set last
    swallowed = nti("--cross-replace", "0.6", "edit.mode=refine")  # taken back from --cross-replace's list
    assert config_from_args(swallowed) == EditConfig(cross_replace=0.6, mode="refine")
    with pytest.raises(ValueError, match="edit.colour"):
        config_from_args(nti("edit.colour=1"))


def test_options_set_the_fields():
    args = parse(
        ["edit", "out", "--edits", "e.jsonl", "--mode", "refine", "--cross-replace", "0.6", "dog=0.3",
         "--self-replace", "0.2", "--guidance-scale", "5", "--local-blend-start", "0.1",
         "--local-blend-threshold", "0.5", "--batch-size", "2", "--attention", "--overwrite"]
    )  # fmt: skip
    assert config_from_args(args) == EditConfig(
        mode="refine",
        cross_replace={"default_": 0.6, "dog": 0.3},
        self_replace=0.2,
        guidance_scale=5.0,
        local_blend_start=0.1,
        local_blend_threshold=0.5,
        batch_size=2,
        attention=True,
        overwrite=True,
    )
    only_words = parse(["edit", "x", "--target", "t", "--cross-replace", "dog=0.3"])
    assert config_from_args(only_words).cross_replace == {"default_": EDIT_DEFAULTS.cross_replace, "dog": 0.3}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--self-replace", "1.5"], "step window"),
        (["--cross-replace", "0.5", "0.6"], "one default fraction"),
        (["--cross-replace", "half"], "not a fraction"),
        (["--cross-replace", "dog=2"], "step window"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--guidance-scale", "-1"], "guidance_scale must be >= 0"),
        (["--local-blend-threshold", "2"], r"local_blend_threshold must be in \[0, 1\]"),
    ],
)
def test_bad_values_are_clear_errors(extra, message):
    with pytest.raises(ValueError, match=message):
        config_from_args(parse(["edit", "x", "--target", "t", *extra]))


def test_edit_config_checks_its_fields():
    with pytest.raises(ValueError, match="unknown edit mode 'swap'"):
        EditConfig(mode="swap")
    with pytest.raises(ValueError, match="step window"):
        EditConfig(cross_replace={"default_": 0.8, "dog": (0.5, 0.2)})
    assert EditConfig(cross_replace=(0.1, 0.9)).to_dict()["cross_replace"] == (0.1, 0.9)
    assert parse_cross_replace({"default": 0.5, "dog": [0.1, 0.3]}, 0.8) == {"default_": 0.5, "dog": (0.1, 0.3)}


def test_help_is_plain_text_with_the_defaults(capsys):
    text = edit_help(capsys)
    for markup in ("``", "`", "**", ":func:", ":class:"):
        assert markup not in text, markup
    assert text.count("nti edit: Prompt-to-Prompt edits of inversions") == 1
    assert f"(default {EDIT_DEFAULTS.cross_replace})" in text and f"(default {EDIT_DEFAULTS.self_replace})" in text
    assert f"(default {EDIT_DEFAULTS.batch_size})" in text
    assert "--overwrite" in text and "<name>-2" in text  # the naming rule is stated


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom nti_lightning.cli import main\ntry:\n    main(['edit', '--help'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'omegaconf') if m in sys.modules))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
