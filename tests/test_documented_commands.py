"""Every ``nti …`` command line in README.md and docs/*.md parses with the real parser and, for ``nti invert``,
its overrides pass the config loader; ``nti edit`` / ``nti eval`` lines their settings' checks. Placeholders
(``/data/images``, ``...``) are fine: nothing is run. Optional ``[...]`` parts are stripped."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nti_lightning.cli import build_parser, invert_overrides, parse_command_line
from nti_lightning.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
ENTRY = re.compile(
    r"^(?:nti|python -m nti_lightning\.cli|\S*torchrun\b.*?-m nti_lightning\.cli)\s+(invert|edit|eval|status)\b"
)


def _optional_parts_stripped(line: str) -> str:
    while (shorter := re.sub(r"\s*\[[^\[\]]*\]", "", line)) != line:
        line = shorter
    return line


def _logical_lines(body: str, first: int):
    """(line number, line) with ``\\``-continued lines joined."""
    pending, start = "", first
    for n, line in enumerate(body.splitlines(), first):
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after ``nti``) of each command line in a non-Python code block; ``cmd1 && nti …`` split,
    comments dropped."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            if block.group(1) in ("python", "json", "yaml", "text"):
                continue
            for n, line in _logical_lines(block.group(2), text[: block.start(2)].count("\n") + 1):
                for part in line.split("&&"):
                    if ENTRY.match(" ".join(shlex.split(part, comments=True))):
                        argv = shlex.split(_optional_parts_stripped(part), comments=True)
                        cli = next(i for i, w in enumerate(argv) if w in ("nti", "nti_lightning.cli"))
                        found.append((f"{doc.name}:{n}", argv[cli + 1 :]))
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_commands_of_every_kind():
    kinds = {argv[0] for _, argv in COMMANDS}
    assert kinds >= {"invert", "edit", "eval"} and len(COMMANDS) >= 20, COMMANDS
    torchrun = [argv for where, argv in COMMANDS if where.startswith("scaleout.md") and "trainer.devices=4" in argv]
    assert len(torchrun) == 2  # the torchrun line's arguments and the plain one
    multi = dict(COMMANDS)["editing.md:9"]  # a \\-continued line, its [...] parts stripped
    assert multi == ["edit", "outputs/nti/images/cat/inversion.safetensors", "--target", "a photo of a dog"]


@pytest.mark.parametrize(
    "argv,error",
    [(["invert", "output.checkpoint_every=10"], ConfigError), (["invert", "--config", "sd3"], ConfigError),
     (["edit", "x.safetensors", "--target", "a", "--cross-replace", "2"], ValueError),
     (["eval", "d", "--out", "o", "--methods", "nti,foo"], ValueError), (["status"], SystemExit)],
)  # fmt: skip
def test_the_check_refuses_a_bad_command(argv, error):
    with pytest.raises(error):
        check_command(argv)


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses_and_its_config_loads(where, argv):
    check_command(argv)


def check_command(argv: list[str]) -> None:
    """Parses ``nti ARGV`` as ``main`` does and checks its settings, without running it."""
    args = parse_command_line(build_parser(), argv)  # SystemExit(2) on a bad argument
    if args.command == "invert":
        load_config(args.config, invert_overrides(args))  # ConfigError on a bad key, value or packaged config
    elif args.command == "edit":
        from nti_lightning.edit_args import config_from_args, parse_assignments

        config_from_args(args)
        parse_assignments(args.reweight, "--reweight")
    elif args.command == "eval":
        from nti_lightning.eval.config import config_from_args

        config_from_args(args)
