"""pyproject.toml's floors are the versions CI tests (.ci/floors.txt), and the direct attention dispatch's tested
range starts at the diffusers floor."""

from __future__ import annotations

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
FLOORED = (
    "lightning",
    "diffusers",
    "transformers",
    "torchmetrics",
    "pyarrow",
    "webdataset",
    "braceexpand",
    "zstandard",
)


def declared_floors() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    floors = {}
    for dep in map(Requirement, deps):
        lower = [s.version for s in dep.specifier if s.operator == ">="]
        if lower:
            floors[dep.name] = lower[0]
    return floors


def pinned(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def test_declared_floors_are_the_pinned_ci_floors():
    floors, ci = declared_floors(), pinned(ROOT / ".ci" / "floors.txt")
    assert {n: Version(floors[n]) for n in FLOORED} == {n: Version(ci[n]) for n in FLOORED}


def test_middle_point_differs_from_the_floors_in_diffusers_only():
    floors, middle = pinned(ROOT / ".ci" / "floors.txt"), pinned(ROOT / ".ci" / "middle.txt")
    assert middle["diffusers"] != floors["diffusers"]
    assert {n: middle[n] for n in FLOORED if n != "diffusers"} == {n: floors[n] for n in FLOORED if n != "diffusers"}


def test_direct_dispatch_range_starts_at_the_diffusers_floor():
    from nti_lightning.models.attention_dispatch import TESTED_DIFFUSERS

    assert Version(TESTED_DIFFUSERS[0]) == Version(declared_floors()["diffusers"])
