"""Shared fixtures: tiny models on CPU, offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the benchmark library nti_bench
sys.path.insert(0, str(Path(__file__).resolve().parent))  # shared test helpers (run_outputs, oracles, …)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


CORE_TESTS = (
    "engine/", "store/", "p2p/", "models/", "store/test_records.py", "run/test_checkpoint.py", "run/test_claim.py",
    "run/test_launch.py", "jobs/test_invert_resume_batched.py", "eval/test_metrics.py", "data/test_shards.py",
    "test_public_api.py", "test_private_contracts.py",
)  # fmt: skip
"""The core set (`pytest -m core`): engine, P2P, save/load and the record formats, families, text, the shard
readers, the run layer's record log, claims and checkpoints, the guarded internals. CI runs it
again at the declared floors and at one middle diffusers release (.ci/versions, docs/versions.md)."""


def pytest_collection_modifyitems(config, items):
    tests = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        rel = os.path.relpath(str(item.path), tests).replace(os.sep, "/")
        if any(rel == c or (c.endswith("/") and rel.startswith(c)) for c in CORE_TESTS):
            item.add_marker(pytest.mark.core)


@pytest.fixture(scope="session")
def random_model():
    """The tiny architecture with seeded random weights: for equalities, not quality."""
    from nti_lightning.models import model_from_components
    from nti_lightning.models.tiny import build_random_components

    return model_from_components(**build_random_components(0), source="tiny-random")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, random_model):
    """The random tiny model written by ``save_pretrained``: a local diffusers folder for ``model.spec``."""
    d = tmp_path_factory.mktemp("model")
    random_model.pipeline.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_model():
    """The embedded default with its trained weights."""
    from nti_lightning import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def sample_images():
    """Three distinct smooth RGB images (uint8 arrays) of different sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((72, 96), (64, 64), (100, 80)):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx + k) * 0.5 + 0.5 for k in rng.uniform(0, 3, 3)], axis=-1)
        noise = rng.normal(0, 0.05, (h, w, 3))
        out.append((np.clip(base + noise, 0, 1) * 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Bit-identity across processes needs one intra-op thread count everywhere (reductions split per thread):
    in-process runs use 1 thread, subprocesses get OMP_NUM_THREADS=1. Modules opt in with ``autouse``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def noise_dataset(request, tmp_path_factory):
    """A folder of seeded 64 px noise images ``<id>.png``, one per id of the test module's ``IDS``, and a
    ``captions.jsonl`` with one prompt per image."""
    import json

    from PIL import Image

    ids = request.module.IDS
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    for k, name in enumerate(ids):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"{name}.png")
    rows = [json.dumps({"image": f"{n}.png", "prompt": f"a photo of thing {k}"}) for k, n in enumerate(ids)]
    (folder / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return folder
