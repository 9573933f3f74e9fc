"""A job's paths made absolute before its ``config.yaml`` is written: the file then works from any folder, and
every rank sees the same paths whatever its working directory."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from nti_lightning.models.loading import EMBEDDED

M = TypeVar("M")  # a model config: ``spec`` and ``config_dir``


def absolute(p: str | None) -> str | None:
    """A path made absolute (``~`` expanded); None stays None."""
    return None if p is None else str(Path(p).expanduser().resolve())


def model_path(spec: str | None) -> str | None:
    """A model argument (``model.spec``, ``model.config_dir``): a local path that exists made absolute; an
    embedded model's name ("tiny", …) and a hub id as they are."""
    if spec is None or spec in EMBEDDED or not Path(spec).expanduser().exists():
        return spec
    return absolute(spec)


def absolute_model(m: M) -> M:
    """A model config with its local paths (``spec``, ``config_dir``) made absolute."""
    return replace(m, spec=model_path(m.spec), config_dir=model_path(m.config_dir))
