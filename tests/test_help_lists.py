"""``nti invert --help`` names every embedded model, every model family and every packaged config."""

from __future__ import annotations

from pathlib import Path

import nti_lightning
from nti_lightning.cli import build_parser
from nti_lightning.models.loading import EMBEDDED


def test_invert_help_lists_the_embedded_models_families_and_configs():
    text = " ".join(build_parser().commands["invert"].format_help().split())  # argparse wraps lines
    for name in EMBEDDED:
        assert f"'{name}'" in text, name
    for family in ("SD1.x", "SD2.x", "SDXL"):
        assert family in text, family
    configs = sorted(p.stem for p in (Path(nti_lightning.__file__).parent / "configs").glob("*.yaml"))
    assert configs == ["fast_cpu", "paper", "sd2", "sdxl"]
    assert all(name in text.split("config by name (")[1].split(")")[0] for name in configs)
