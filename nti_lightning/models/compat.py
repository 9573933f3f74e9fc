"""What differs between the diffusers releases the package supports (pyproject.toml, docs/versions.md)."""

from __future__ import annotations

import torch

DIFFUSERS_DTYPE_RENAME = "0.40"
"""The diffusers release whose ``from_pretrained`` / ``from_single_file`` take ``dtype`` (``torch_dtype`` is
deprecated from there on, with a FutureWarning; older releases know only ``torch_dtype``)."""


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``{name: dtype}`` for diffusers' loaders, under the name the installed diffusers takes."""
    import diffusers
    from packaging.version import Version

    renamed = Version(diffusers.__version__).release >= Version(DIFFUSERS_DTYPE_RENAME).release
    return {"dtype" if renamed else "torch_dtype": dtype}
