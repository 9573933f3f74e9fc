"""Helpers shared by the tests of dataset runs: read an output folder's embeddings, compare it to a reference,
run ``nti invert`` with the fast settings in this process or as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from nti_lightning.run import read_manifest
from nti_lightning.store.inversion import load_inversion


def read_nulls(out) -> dict[str, torch.Tensor]:
    """id → null embeddings (T, L, D) of every image recorded "ok" in ``out``'s manifests."""
    ok = {k: r for k, r in read_manifest(out).items() if r["status"] == "ok"}
    return {k: load_inversion(out / r["paths"]["inversion"]).null_embeddings for k, r in ok.items()}


def assert_same_as_reference(out, reference: dict[str, torch.Tensor], ids: list[str]) -> None:
    """Every image done, bit-identical to the reference run; no checkpoint or temp file left."""
    got = read_nulls(out)
    assert sorted(got) == ids
    for k in ids:
        assert torch.equal(got[k], reference[k]), k
    assert not list(out.rglob("*.tmp")) and not list((out / "checkpoints").glob("*.pt"))
    assert [r["status"] for r in read_manifest(out).values()] == ["ok"] * len(ids)


ROOT = Path(__file__).resolve().parents[1]
FAST = ["inversion.num_ddim_steps=3", "inversion.num_inner_steps=2", "inversion.image_size=64",
        "inversion.batch_size=1", "output.compute_baseline=false", "output.save_strip=false",
        "output.checkpoint_every_s=0", "trainer.accelerator=cpu"]  # fmt: skip


def invert_args(dataset, out, model, *extra) -> list[str]:
    """``nti invert`` of a test dataset (images + captions.jsonl) with ``FAST`` settings."""
    return ["invert", "--images", str(dataset), "--captions", str(dataset / "captions.jsonl"), "--output", str(out),
            f"model.spec={model}", "--quiet", *FAST, *extra]  # fmt: skip


def spawn_invert(dataset, out, model, *extra, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "nti_lightning.cli", *invert_args(dataset, out, model, *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(pred, proc, timeout=120.0) -> None:
    end = time.time() + timeout
    while not pred():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < end, "timed out"
        time.sleep(0.05)
