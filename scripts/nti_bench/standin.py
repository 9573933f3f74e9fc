"""A stand-in for the slot engine and the per-group decode and metrics, for the data-plane benchmark.

``StandInEngine`` has ``SlotEngine``'s interface (``run(admissions)`` yielding ``Finished`` and ``Tick`` events,
``rows``, ``num_slots``, ``tags``, ``state_dict``/``load_state_dict``, ``discard``) and costs no UNet time: an
admitted image is finished after ``ticks`` calls, and each call serves the ``rows`` oldest images, as the
engine does; with ``call_s`` each call also waits that long in ``time.sleep``, which releases the GIL as a wait
on a GPU does (the data plane's threads run meanwhile). Its records have the shapes of a real model's
(``Shape``: SD1.5's ∅_t (50, 77, 768) and z (4, 64, 64), or a slim shape with the same T and L for runs whose bytes
must fit a small disk), with the structure the codec sees in real ones: ∅_t a random walk along t from a fixed ∅_T
(Algorithm 1 starts ∅_{t−1} from ∅_t and moves it by a few Adam steps of lr 1e-2). The walks come from a pool made
once, so making a record costs nothing. Its state (what a checkpoint holds) has the in-flight images' ∅_t, as
the slot bank's does.

``standin_measure`` replaces ``invert_outputs.measure_group`` (no VAE, no metrics work): metrics shaped like
the real ones with a PSNR drawn per image (a few outliers, which the shards layout gives PNGs), and the input
as the strip's pictures.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from nti_lightning.engine.slots import Finished, Tick
from nti_lightning.jobs.invert_outputs import Measured
from nti_lightning.store.inversion import Inversion


@dataclass(frozen=True)
class Shape:
    """A record's tensor shapes: ∅_t (T, L, D), latents (C, h, w)."""

    T: int = 50
    L: int = 77
    D: int = 768
    latent: tuple[int, int, int] = (4, 64, 64)


SHAPES = {"sd15": Shape(), "slim": Shape(D=8, latent=(4, 16, 16))}
ENGINE_SECONDS = [0.0]
"""Seconds the stand-in engines of this process spent in their GPU-like waits (``call_s``)."""


class Pool:
    """``size`` records' tensors, made once (module docstring)."""

    def __init__(self, shape: Shape, size: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(shape.L, shape.D, generator=g) * 0.8  # ∅_T = ψ(""): values of order 1
        steps = torch.randn(size, shape.T, shape.L, shape.D, generator=g) * 0.01
        steps[:, 0] = 0
        self.nulls = (base + steps.cumsum(1)).contiguous()  # (size, T, L, D)
        self.latents = torch.randn(size, 2, *shape.latent, generator=g)  # z_T = z*_T (Algorithm 1), z*_0
        self.shape, self.size = shape, size
        self.timesteps = torch.arange(shape.T - 1, -1, -1, dtype=torch.long) * (1000 // shape.T) + 1

    def record(self, k: int, prompt: str, meta: dict) -> Inversion:
        k %= self.size
        z = self.latents[k]
        return Inversion(
            z_T=z[0], null_embeddings=self.nulls[k], timesteps=self.timesteps, prompt=prompt, pivot_z0=z[1],
            pivot_zT=z[0], inner_steps=torch.full((self.shape.T,), 4, dtype=torch.long),
            final_loss=torch.full((self.shape.T,), 1e-5), meta=dict(meta), z_0=z[1],
        )  # fmt: skip


def _seed(tag: str) -> int:
    return int.from_bytes(hashlib.blake2b(tag.encode(), digest_size=4).digest(), "little")


class StandInEngine:
    """``SlotEngine``'s interface without a UNet (module docstring)."""

    def __init__(
        self, model, cfg, rows, runtime=None, slots=None, pad=False, image_size=None, *, pool, ticks=32, call_s=0.0
    ):
        self.rows, self.num_slots, self.pool, self.ticks = rows, slots or 2 * rows - 1, pool, ticks
        self.call_s = call_s  # each call waits this long without the GIL, as a wait on a GPU does
        self.slots: list[list | None] = [None] * self.num_slots  # [tag, prompt, calls so far, since]
        self.tick = 0
        self.meta = {
            "method": cfg.method, "model_source": "stand-in", "model_fingerprint": model.fingerprint,
            "family": "sd1", "prediction_type": "epsilon", "image_size": image_size,
            "scheduler": {"beta_schedule": "scaled_linear"}, "hyperparameters": {"num_ddim_steps": pool.shape.T},
            "precision": "32-true",
        }  # fmt: skip

    def run(self, admissions):
        source, exhausted = iter(admissions), False
        while True:
            for s in range(self.num_slots):
                if self.slots[s] is None and not exhausted:
                    adm = next(source, None)
                    if adm is None:
                        exhausted = True
                        break
                    self.slots[s] = [adm.tag, adm.prompt, 0, self.tick]
            active = sorted((s for s, st in enumerate(self.slots) if st is not None), key=lambda s: self.slots[s][3])
            if not active:
                return
            rows = active[: self.rows]
            self.tick += 1
            if self.call_s:
                t0 = time.perf_counter()
                time.sleep(self.call_s)
                ENGINE_SECONDS[0] += time.perf_counter() - t0
            for s in rows:
                st = self.slots[s]
                st[2] += 1
                if st[2] >= self.ticks:
                    self.slots[s] = None
                    yield Finished(st[0], self.pool.record(_seed(st[0]), st[1], self.meta), 0.0)
            yield Tick(self.tick, "grad", len(rows), len(active))

    @property
    def tags(self) -> list:
        return [st[0] for st in self.slots if st is not None]

    def state_dict(self) -> dict:
        occupied = [s for s, st in enumerate(self.slots) if st is not None]
        bank = torch.stack([self.pool.nulls[_seed(self.slots[s][0]) % self.pool.size] for s in occupied]) if \
            occupied else torch.zeros(0)  # fmt: skip
        return {"slots": [None if st is None else list(st) for st in self.slots], "tick": self.tick, "bank": bank}

    def load_state_dict(self, state: dict) -> None:
        if len(state["slots"]) != self.num_slots:
            raise ValueError("slots differ")
        self.slots = [None if st is None else list(st) for st in state["slots"]]
        self.tick = int(state["tick"])

    def discard(self, tag_matches) -> list:
        out = []
        for s, st in enumerate(self.slots):
            if st is not None and tag_matches(st[0]):
                out.append(st[0])
                self.slots[s] = None
        return out


def _metric(k: int) -> dict:
    psnr = 10.0 if k % 500 == 7 else 28.0 + (k % 97) / 24.0  # 0.2 % outliers 18+ dB under the median
    return {"psnr": psnr, "ssim": 0.8 + (k % 13) / 100}


def standin_measure(model, cfg, group, runtime) -> list[Measured]:
    """``measure_group`` without the VAE: metrics of the real records' shape, the input as the pictures."""
    out = []
    for d in group:
        k = _seed(d.item.id)
        metrics = {
            cfg.inversion.method: {"vs_input": _metric(k + 1), "vs_vae": _metric(k)},
            "vae_roundtrip_vs_input": _metric(k + 2),
            f"{cfg.inversion.method}_latent_mse": 0.01 + (k % 7) / 1000,
            "inner_steps": int(d.inversion.inner_steps.sum()),
            "skipped_steps": 0,
        }
        out.append(Measured(metrics, [("input", d.pixels), ("NTI", d.pixels)]))
    return out
