"""The other inverters as generators, driven with a fake slot and no UNet (``engine.inverters``); the slot bank's
loss (``engine.slot_bank``); the step guidance a record asks for (``engine.step_guidance``); the batch-size probe
against a fake memory model (``engine.batch_probe``)."""

from __future__ import annotations

import pytest
import torch

from nti_lightning.config import InversionConfig
from nti_lightning.engine import batch_probe
from nti_lightning.engine.algorithm import Progress
from nti_lightning.engine.ddim import classifier_free_guidance, ddim_transition, row_alphas, schedule_from_scheduler
from nti_lightning.engine.inverters import INVERTERS, get_inverter
from nti_lightning.engine.nulltext import latent_mse
from nti_lightning.engine.slot_bank import SlotBank
from nti_lightning.engine.step_guidance import DirectInversionGuidance, record_guidance
from nti_lightning.store.inversion import Inversion


class FakeSlot:
    def __init__(self) -> None:
        self.progress, self.calls = Progress(), []

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *a, **k: self.calls.append((name, *a, *k.values()))


def _requests(method: str, T: int = 3) -> tuple[list[tuple], list[tuple]]:
    slot, cfg = FakeSlot(), InversionConfig(method=method, num_ddim_steps=T)
    gen, requests = get_inverter(method).run(slot, cfg), []
    try:
        req = next(gen)
        while True:
            requests.append((req.kind.value, req.index))
            req = gen.send(None)
    except StopIteration:
        return requests, slot.calls


@pytest.mark.parametrize("method, fill", [("ddim", False), ("npi", True), ("proxnpi", True)])
def test_pivot_only_methods_fill_their_nulls_once(method, fill):
    requests, calls = _requests(method)
    assert requests == [("pivot", 0), ("pivot", 1), ("pivot", 2)]  # T UNet calls, none with grad
    assert calls == [("fill_nulls", fill)]  # ψ("") for ddim, ψ(P) for NPI (Miyake et al. 2023)


def test_direct_inversion_corrects_to_the_pivot_at_every_step():
    requests, calls = _requests("direct")
    assert requests[3:] == [("cond", 0), ("advance", 0), ("cond", 1), ("advance", 1), ("cond", 2), ("advance", 2)]
    assert [c for c in calls if c[0] == "correct_to_pivot"] == [("correct_to_pivot", i) for i in range(3)]
    assert calls[0] == ("start_optimisation",) and ("carry_null_forward", 2) not in calls
    assert set(INVERTERS) == {"ddim", "nti", "npi", "proxnpi", "direct"}


def test_training_step_is_line_9s_loss(random_model):
    """The bank's training_step equals ‖z*_{t−1} − DDIM(z̄_t, CFG(ε(∅_t), ε(C), w))‖² per row, computed here from the
    pure functions."""
    schedule = schedule_from_scheduler(random_model.scheduler, 4)
    null = {"prompt_embeds": torch.zeros(1, 77, 32)}
    bank = SlotBank(2, 4, (4, 8, 8), null, ("prompt_embeds",))
    g = torch.Generator().manual_seed(0)
    z, cond_out, target = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t = schedule.timesteps[torch.tensor([0, 2])]
    denoise = lambda z, t, c: 0.1 * z + c["prompt_embeds"].mean()  # noqa: E731 — a stand-in UNet
    null_rows = {"prompt_embeds": bank.working["prompt_embeds"][torch.tensor([0, 1])]}
    batch = {"denoise": denoise, "schedule": schedule, "guidance_scale": 7.5, "z": z, "t": t, "null": null_rows,
             "cond_out": cond_out, "target": target}  # fmt: skip
    loss = bank.training_step(batch)
    a_t, a_prev = row_alphas(schedule, t)
    guided = classifier_free_guidance(denoise(z, t, batch["null"]), cond_out, 7.5)
    assert torch.equal(loss, latent_mse(ddim_transition(z, guided, a_t, a_prev, "epsilon"), target))
    loss.sum().backward()
    assert bank.working["prompt_embeds"].grad is not None  # the gradient reaches the parameters


def _record(sampling=None, corrections=None) -> Inversion:
    T = 2
    meta = {"sampling": sampling} if sampling else {}
    z = torch.zeros(4, 8, 8)
    return Inversion(z, torch.zeros(T, 77, 32), torch.tensor([501, 1]), "p", z, z, torch.zeros(T, dtype=torch.long),
                     torch.zeros(T), meta, corrections=corrections)  # fmt: skip


def test_record_guidance_follows_the_records_sampling():
    assert record_guidance([_record()]) is None  # nti, ddim, npi: plain classifier-free guidance
    c = torch.ones(2, 4, 8, 8)
    g = record_guidance([_record({"kind": "direct"}, c)], rows_per_image=2, edit=True)
    assert isinstance(g, DirectInversionGuidance)
    z = torch.zeros(2, 4, 8, 8)
    out = g.after_step(0, 1, z)
    assert torch.equal(out[0], c[0]) and torch.equal(out[1], torch.zeros(4, 8, 8))  # the source row only
    with pytest.raises(ValueError, match="different methods"):
        record_guidance([_record(), _record({"kind": "direct"}, c)])
    with pytest.raises(ValueError, match="hold no corrections"):
        record_guidance([_record({"kind": "direct"})])


def test_the_probe_takes_the_largest_power_of_two_that_fits(random_model, monkeypatch):
    """A fake device: 50 MB fixed + 100 MB a row, 1000 MB free → 8 rows fit in 85 % (16 would not); an
    out-of-memory at the chosen size halves it."""
    state = {"rows": 0, "oom_at": None}
    real = batch_probe.SlotEngine._run_grad

    def run_grad(self, rows):
        state["rows"] = len(rows)
        if state["oom_at"] == len(rows):
            raise torch.OutOfMemoryError("fake")
        return real(self, rows)

    monkeypatch.setattr(batch_probe.SlotEngine, "_run_grad", run_grad)
    for name, value in {"synchronize": lambda d=None: None, "reset_peak_memory_stats": lambda d=None: None,
                        "memory_allocated": lambda d=None: 0, "empty_cache": lambda: None,
                        "max_memory_allocated": lambda d=None: (50 + 100 * state["rows"]) * 2**20,
                        "mem_get_info": lambda d=None: (1000 * 2**20, 2000 * 2**20)}.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, value)
    cfg = InversionConfig(num_ddim_steps=2, num_inner_steps=1, image_size=64)
    assert batch_probe.probe_batch_size(random_model, cfg, None, 64) == 8
    state["oom_at"] = 8
    assert batch_probe.probe_batch_size(random_model, cfg, None, 64) == 4
