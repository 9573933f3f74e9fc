"""Each "skipped" line of a missing metric network names the ``nti eval`` flag that gives it, and that flag exists."""

from __future__ import annotations

import logging
import re

from nti_lightning.cli import build_parser
from nti_lightning.eval.metrics import Backbones, load_nets


def test_skip_lines_name_real_nti_eval_flags(caplog):
    with caplog.at_level(logging.INFO, logger="nti_lightning.eval.metrics"):
        load_nets(Backbones())
    flags = [re.search(r"nti eval (--\w+) PATH", r.getMessage()) for r in caplog.records]
    assert all(flags) and [f.group(1) for f in flags] == ["--lpips", "--dino", "--clip"]
    args = build_parser().parse_args(["eval", "data", "--out", "out", "--lpips", "a.pth", "--dino", "d", "--clip", "c"])
    assert (args.lpips, args.dino, args.clip) == ("a.pth", "d", "c")
    assert not any("backbones." in r.getMessage() for r in caplog.records)
