"""Fixtures of the Prompt-to-Prompt tests: the seeded random tiny model (session-wide), one thread."""

from __future__ import annotations

import pytest

from .helpers import make_inversion


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small tensors: threads only add overhead (and noise on a shared machine)."""


@pytest.fixture
def model(random_model):
    return random_model


@pytest.fixture
def tok(random_model):
    return random_model.tokenizer


@pytest.fixture(scope="session")
def inv(random_model):
    return make_inversion(random_model)
