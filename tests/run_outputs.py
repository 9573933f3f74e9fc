"""Helpers shared by the tests of dataset runs: read an output folder's embeddings, compare it to a reference."""

from __future__ import annotations

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
