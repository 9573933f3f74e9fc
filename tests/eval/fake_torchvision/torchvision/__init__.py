"""A stand-in for torchvision in tests/eval/test_lpips_public.py: only what torchmetrics' LPIPS uses of it."""

from . import models  # noqa: F401

__version__ = "0.28.0"
