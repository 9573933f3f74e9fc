"""Continuous batching of Algorithm 1 over a stream of images: every UNet call full, whatever each image is doing.

Each image runs ``algorithm.null_text_inversion`` in a *slot*. At every tick the engine collects the slots'
pending requests, runs one UNet call over ``rows`` of them — either a call with grad (INNER steps of images
optimising their ∅_t) or one without (pivot steps, conditional branches, advances z̄_t → z̄_{t−1}) — and
answers each image, which moves on to its next request. An image that meets the early-stop rule at timestep t
takes up timestep t − 1's work at the next tick instead of idling; an image that finishes t = 1 leaves its
slot to the next image of the stream. With ``2·rows − 1`` slots one kind of request always has ``rows`` rows
ready (pigeonhole), so every call is full until the stream's tail: shapes never change, and a compiled UNet
compiles once per kind (``pad=True`` keeps them fixed at the tail too).

Per image nothing changes: each row gets its own timestep (a (B,) timestep tensor), its own DDIM
coefficients, its own Adam (``nulltext.RowAdam``: moments, step count, learning rate) reset per timestep, its
own early stop; rows never interact (GroupNorm and attention are per sample). An image whose loss or latent
goes non-finite fails alone: its slot is freed and refilled. With ``InversionConfig.batch_invariant`` every
call is evaluated row by row, so each image's numbers are bit-identical to inverting it alone.

``slot_bank.SlotBank`` is the Lightning module: its parameters are the null embeddings being optimised, ∅_t of every
slot's current timestep, stepped by ``nulltext.RowAdam`` (a ``torch.optim.Optimizer`` set up through Fabric, so
precision — autocast, 16-mixed's per-row loss scaling — is Fabric's); one row's step touches one row. Its
buffers are the per-slot tensors the steps read (pivot trajectory, z̄_t, the conditional branch, the finished
{∅_t}). ``SlotEngine.state_dict()`` is the whole state: a run resumed from it continues bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from nti_lightning import __version__
from nti_lightning.config import InversionConfig
from nti_lightning.engine.algorithm import Progress
from nti_lightning.engine.ddim import schedule_from_scheduler
from nti_lightning.engine.inverters import get_inverter
from nti_lightning.engine.nulltext import RowAdam
from nti_lightning.engine.runtime import Runtime
from nti_lightning.engine.sampling import encode_latents
from nti_lightning.engine.slot_bank import SlotBank
from nti_lightning.engine.slot_calls import run_grad, run_no_grad
from nti_lightning.engine.slot_state import SlotState, engine_state, load_engine_state
from nti_lightning.store.inversion import Inversion, scheduler_identity

# ---------------------------------------------------------------------------------------------------------
# Inputs and events
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Admission:
    """One image for the engine: ``tag`` is the caller's handle (JSON-able if the engine is checkpointed)."""

    tag: Any
    pixels: Tensor  # (3, H, W) in [-1, 1]
    prompt: str


@dataclass
class Finished:
    tag: Any
    inversion: Inversion
    seconds: float = 0.0  # this image's share of the UNet calls it took part in (each call's time / its rows)


@dataclass
class Failed:
    tag: Any
    error: str


@dataclass
class Tick:
    """After every UNet call: the caller may checkpoint (``SlotEngine.state_dict``) or stop here."""

    number: int
    kind: str  # "grad" or "no_grad"
    rows: int  # real rows in the call (the rest padding)
    active: int  # images in slots


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------


class _SlotHandle:
    """``inverters.InverterSlot`` for slot ``s``: the non-UNet parts of the inverters on the bank's rows."""

    def __init__(self, engine: SlotEngine, s: int) -> None:
        self.engine, self.s = engine, s
        self.progress = engine.slots[s].progress

    @torch.no_grad()
    def start_optimisation(self) -> None:  # line 6: z̄_T ← z*_T, ∅_T ← ψ("")
        bank, s = self.engine.bank, self.s
        bank.z_bar[s] = bank.trajectory[s, -1]
        for k in bank.learnable:
            bank.working[k][s] = bank.null(k)[0]
            bank.null_embeddings[k][s, 0] = bank.null(k)[0]

    def fresh_adam(self) -> None:
        if self.engine.adam is not None:
            self.engine.adam.reset(torch.tensor([self.s]))

    @torch.no_grad()
    def commit_null(self, i: int) -> None:  # ∅_t optimised: into {∅_t}; it stays the start of ∅_{t−1} (line 11)
        bank, s = self.engine.bank, self.s
        for k in bank.learnable:
            bank.null_embeddings[k][s, i] = bank.working[k][s]

    @torch.no_grad()
    def carry_null_forward(self, i: int) -> None:  # ∅_{t−1} ← ∅_t in {∅_t} (methods that do not optimise)
        bank, s = self.engine.bank, self.s
        for k in bank.learnable:
            bank.null_embeddings[k][s, i + 1] = bank.null_embeddings[k][s, i]

    @torch.no_grad()
    def fill_nulls(self, source_prompt: bool) -> None:  # ddim: every ∅_t ← ψ(""); NPI: every ∅_t ← ψ(P)
        bank, s = self.engine.bank, self.s
        for k in bank.learnable:
            bank.null_embeddings[k][s, :] = bank.cond(k)[s] if source_prompt else bank.null(k)[0]

    @torch.no_grad()
    def correct_to_pivot(self, i: int) -> None:  # Direct Inversion: c_t ← z*_{t−1} − z̄_{t−1}; z̄_{t−1} ← z*_{t−1}
        bank, s = self.engine.bank, self.s
        target = bank.trajectory[s, bank.trajectory.shape[1] - 2 - i]
        bank.corrections[s, i] = target - bank.z_bar[s]
        bank.z_bar[s] = target


class SlotEngine:
    """Runs Algorithm 1 for a stream of images, ``rows`` rows per UNet call, over ``slots`` slots.

    ``run(admissions)`` yields ``Finished``/``Failed`` per image and a ``Tick`` after every UNet call. Images
    are admitted in stream order as slots free up; the schedule depends only on the state, so a run is
    deterministic and ``state_dict``/``load_state_dict`` resume it exactly.
    """

    def __init__(
        self,
        model,
        cfg: InversionConfig,
        rows: int,
        runtime: Runtime | None = None,
        slots: int | None = None,
        pad: bool = False,
        image_size: int | None = None,
    ) -> None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.model, self.cfg, self.rows, self.pad = model, cfg, rows, pad
        self.runtime = runtime or Runtime()
        self.num_slots = slots or 2 * rows - 1
        self.schedule = schedule_from_scheduler(model.scheduler, cfg.num_ddim_steps)
        self.denoise = self.runtime.denoiser(model.unet, model.family, per_sample=cfg.batch_invariant)
        self.inverter = get_inverter(cfg.method)
        size = image_size or cfg.image_size or model.native_image_size
        self.family = model.family.at_size(size)  # SDXL: time ids of this size
        f = model.vae_scale_factor
        latent_shape = (int(model.unet.config.in_channels), size // f, size // f)
        null = self.family.null(model, 1)
        learnable = self.family.learnable_keys(cfg.optimize)  # SD: prompt_embeds; SDXL: + text_embeds [+ time_ids]
        T, corrections = cfg.num_ddim_steps, self.inverter.keeps_corrections
        self.bank = SlotBank(self.num_slots, T, latent_shape, null, learnable, corrections)
        self.bank.to(model.device)
        # the per-row Adam over the nulls being optimised, stepped through Fabric's precision plugin
        self.adam = RowAdam(list(self.bank.working.values())) if learnable else None
        self._stepper = self.runtime.setup_optimizer(self.adam) if learnable else None
        self.slots: list[SlotState | None] = [None] * self.num_slots
        self.tick = 0
        self.calls = {"grad": 0, "no_grad": 0, "rows": 0, "padded_rows": 0}
        self.image_size = size
        self._meta = {
            "nti_lightning_version": __version__,
            "method": cfg.method,
            "model_source": model.source,
            "model_config_dir": model.config_dir,
            "model_fingerprint": model.fingerprint,
            "family": self.family.name,
            "prediction_type": self.schedule.prediction_type,
            "scheduler": scheduler_identity(model.scheduler),
            "hyperparameters": asdict(cfg),
            "image_size": size,
            "precision": self.runtime.precision,
        }
        if self.inverter.sampling is not None:
            self._meta["sampling"] = self.inverter.sampling(cfg)

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self, admissions) -> Iterator[Finished | Failed | Tick]:
        """Inverts every admission; yields events as they happen (see the module docstring)."""
        source, exhausted = iter(admissions), False
        while True:
            # 1. Fill free slots in stream order
            for s in range(self.num_slots):
                if self.slots[s] is None and not exhausted:
                    adm = next(source, None)
                    if adm is None:
                        exhausted = True
                        break
                    failure = self._admit(s, adm)
                    if failure is not None:
                        yield failure
            active = [s for s, st in enumerate(self.slots) if st is not None]
            if not active:
                return
            # 2. One UNet call over the oldest requests of one kind
            grad, rows = self._pick(active)
            t0 = time.perf_counter()
            answers = self._run_grad(rows) if grad else self._run_no_grad(rows)
            share = (time.perf_counter() - t0) / len(rows)
            for s in rows:
                self.slots[s].seconds += share
            self.tick += 1
            # 3. Answer each image; it moves on, finishes or fails
            for s, answer in answers.items():
                event = self._answer(s, answer)
                if event is not None:
                    yield event
            yield Tick(self.tick, "grad" if grad else "no_grad", len(rows), len(active))

    def _pick(self, active: list[int]) -> tuple[bool, list[int]]:
        """The kind with ``rows`` requests ready whose oldest waits longest (at the tail: the oldest kind)."""
        queues: dict[bool, list[int]] = {True: [], False: []}
        for s in sorted(active, key=lambda s: (self.slots[s].since, s)):
            queues[self.slots[s].request.kind.needs_grad].append(s)
        full = [g for g, q in queues.items() if len(q) >= self.rows]
        candidates = full or [g for g, q in queues.items() if q]
        grad = min(candidates, key=lambda g: (self.slots[queues[g][0]].since, queues[g][0]))
        return grad, queues[grad][: self.rows]

    # -- admission and answers -----------------------------------------------------------------------------

    @torch.no_grad()
    def _admit(self, s: int, adm: Admission) -> Failed | None:
        """Line 1 of Algorithm 1: C = ψ(P) and z*_0 = E(I), one image at a time (the same numbers however the
        stream is batched); then the image's first request."""
        bank = self.bank
        try:
            z0 = encode_latents(self.model, adm.pixels[None].to(self.model.device))[0]  # (C, h, w)
            cond = self.family.encode_prompts(self.model, [adm.prompt])
            if not torch.isfinite(z0).all():
                raise FloatingPointError("the VAE encoding of the image is not finite")
        except Exception as e:  # noqa: BLE001 — one image's failure must not stop the stream
            return Failed(adm.tag, f"encoding failed: {type(e).__name__}: {e}")
        bank.trajectory[s] = 0
        bank.trajectory[s, 0] = z0
        for k, v in cond.items():
            bank.cond(k)[s] = v[0].to(bank.cond(k).device)
        bank.inner_steps[s] = 0
        bank.final_loss[s] = float("nan")
        self.slots[s] = SlotState(adm.tag, adm.prompt, Progress())
        self._start(s)
        return None

    def _start(self, s: int) -> None:
        st = self.slots[s]
        st.gen = self.inverter.run(_SlotHandle(self, s), self.cfg)
        st.request = next(st.gen)
        st.since = self.tick

    def _answer(self, s: int, answer) -> Finished | Failed | None:
        st = self.slots[s]
        if isinstance(answer, Exception):
            return self._free(s, Failed(st.tag, str(answer)))
        try:
            st.request = st.gen.send(answer)
            st.since = self.tick
        except StopIteration:
            return self._free(s, Finished(st.tag, self._record(s), st.seconds))
        except FloatingPointError as e:
            return self._free(s, Failed(st.tag, str(e)))
        return None

    def _free(self, s: int, event):
        self.slots[s].gen.close()
        self.slots[s] = None
        return event

    def discard(self, tag_matches) -> list[Any]:
        """Frees the slots whose tag ``tag_matches(tag)``; returns their tags (an image whose file changed)."""
        out = []
        for s, st in enumerate(self.slots):
            if st is not None and tag_matches(st.tag):
                out.append(st.tag)
                self._free(s, None)
        return out

    def _record(self, s: int) -> Inversion:
        """Algorithm 1, line 13: z̄_T = z*_T and {∅_t}, with the pivot's ends and the optimisation's log (and what
        the method keeps besides: the pivot for proxnpi, the corrections for direct)."""
        bank, p, inv = self.bank, self.slots[s].progress, self.inverter
        T = self.cfg.num_ddim_steps
        inner = bank.inner_steps[s].cpu()
        meta = dict(self._meta)
        meta["skipped_steps"] = p.skipped
        # requests answered, by kind: p.i outer steps each took one COND and one ADVANCE call
        meta["unet_calls"] = {"pivot": p.pivot_steps, "cond": p.i, "uncond_grad": int(inner.sum()) + p.skipped,
                              "uncond": p.i}  # fmt: skip
        nulls = {k: bank.null_embeddings[k][s].detach().cpu().clone() for k in bank.learnable}  # {key: (T, …)}
        if "prompt_embeds" not in nulls:  # not optimised: the model's null at every step
            nulls["prompt_embeds"] = bank.null("prompt_embeds").cpu().expand(T, *bank.null("prompt_embeds").shape[1:])
        return Inversion(
            z_T=bank.trajectory[s, T].cpu().clone(),
            null_embeddings=nulls.pop("prompt_embeds").clone(),
            null_extra=nulls,
            timesteps=self.schedule.timesteps.cpu(),
            prompt=self.slots[s].prompt,
            pivot_z0=bank.trajectory[s, 0].cpu().clone(),
            pivot_zT=bank.trajectory[s, T].cpu().clone(),
            inner_steps=inner.clone(),
            final_loss=bank.final_loss[s].cpu().clone(),
            meta=meta,
            z_0=bank.z_bar[s].cpu().clone() if p.i == T else None,  # the sampled z̄_0 where the method ran it
            trajectory=bank.trajectory[s].cpu().clone() if inv.keeps_trajectory else None,
            corrections=bank.corrections[s].cpu().clone() if inv.keeps_corrections else None,
        )

    # -- the two kinds of UNet call ------------------------------------------------------------------------

    def _run_no_grad(self, rows: list[int]) -> dict[int, Any]:
        return run_no_grad(self, rows)

    def _run_grad(self, rows: list[int]) -> dict[int, Any]:
        return run_grad(self, rows)

    # -- checkpoints ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit (``slot_state.engine_state``)."""
        return engine_state(self)

    def load_state_dict(self, state: dict) -> None:
        load_engine_state(self, state)

    @property
    def tags(self) -> list[Any]:
        """The tags of the images in slots."""
        return [st.tag for st in self.slots if st is not None]
