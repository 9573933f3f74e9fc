"""The slot engine (continuous batching of Algorithm 1): per-image equality, per-row Adam, failures, resume."""

import pytest
import torch

from nti_lightning import invert, load_inversion, save_inversion
from nti_lightning.api import reconstruction_latents
from nti_lightning.config import InversionConfig
from nti_lightning.data.image import prepare_image
from nti_lightning.engine.nulltext import RowAdam
from nti_lightning.engine.reference import baseline_invert
from nti_lightning.engine.slots import Admission, Failed, Finished, SlotEngine, Tick
from nti_lightning.models import model_from_components
from nti_lightning.models.tiny import build_random_components
from nti_lightning.store.codec_names import LOSSLESS_CODEC
from nti_lightning.store.inversion import IncompatibleInversionError

PROMPTS = ["a photo of a cat", "a red car on a road", "coffee"]
FAST = dict(num_ddim_steps=4, image_size=64)


def _mixed_epsilon(model, images):
    """An early-stop ε between the images' first losses, so some stop at once and others don't."""
    first = [
        invert(model, [im], [p], num_inner_steps=1, early_stop=False, **FAST)[0].final_loss[0]
        for im, p in zip(images, PROMPTS)
    ]
    lo, hi = min(first).item(), max(first).item()
    assert hi > lo
    return (lo + hi) / 2


def _admissions(model, images, prompts, size=64):
    return [Admission(k, prepare_image(im, size), p) for k, (im, p) in enumerate(zip(images, prompts))]


def _run(engine, admissions, stop_after=None):
    out, failed = {}, {}
    for ev in engine.run(admissions):
        if isinstance(ev, Finished):
            out[ev.tag] = ev.inversion
        elif isinstance(ev, Failed):
            failed[ev.tag] = ev.error
        elif isinstance(ev, Tick) and stop_after is not None and ev.number == stop_after:
            return out, failed, engine.state_dict()
    return out, failed, None


def test_batch_invariant_slots_equal_one_at_a_time_bitwise(random_model, sample_images):
    eps = _mixed_epsilon(random_model, sample_images)
    kw = dict(num_inner_steps=4, early_stop_epsilon=eps, early_stop_slope=0.0, batch_invariant=True, **FAST)
    batched = invert(random_model, sample_images, PROMPTS, batch_size=2, **kw)  # 2 rows, 3 slots
    singles = [invert(random_model, [im], [p], **kw)[0] for im, p in zip(sample_images, PROMPTS)]
    steps = torch.stack([inv.inner_steps for inv in batched])  # (3, T)
    assert len(set(steps.sum(1).tolist())) > 1, "early stop must differ between the images"
    assert steps.min() >= 1 and steps.max() == 4
    for b, s in zip(batched, singles):
        for name in ("inner_steps", "null_embeddings", "z_0", "z_T", "final_loss"):
            assert torch.equal(getattr(b, name), getattr(s, name)), name


def test_default_batched_mode_stays_within_rounding(tiny_model, sample_images):
    """Default mode, trained tiny model at its native size (a random UNet at 8×8 latents is chaotic: it turns
    batch-size rounding into O(1) differences): batched results equal one-image results to rounding."""
    kw = dict(num_ddim_steps=4, num_inner_steps=3, early_stop=False)
    batched = invert(tiny_model, sample_images, PROMPTS, batch_size=2, **kw)
    singles = [invert(tiny_model, [im], [p], **kw)[0] for im, p in zip(sample_images, PROMPTS)]
    for b, s in zip(batched, singles):
        assert torch.equal(b.inner_steps, s.inner_steps)
        assert (b.z_T - s.z_T).abs().max() <= 1e-4
        assert (b.z_0 - s.z_0).abs().max() <= 1e-3
        assert (b.null_embeddings - s.null_embeddings).abs().max() <= 1e-3


def test_row_adam_equals_torch_adam_per_row():
    """RowAdam (a torch.optim.Optimizer over the rows of its parameters) steps each selected row exactly as
    ``torch.optim.Adam`` on that row alone; rows not selected, or selected but not applied, do not move."""
    torch.manual_seed(0)
    R, shape = 3, (5, 4)
    params = torch.nn.Parameter(torch.randn(R, *shape))
    adam = RowAdam([params])
    refs = [params[r].detach().clone().requires_grad_(True) for r in range(R)]
    lrs = [1e-2, 5e-3, 2e-2]
    opts = [torch.optim.Adam([p], lr=lr) for p, lr in zip(refs, lrs)]
    for i in range(12):
        rows = torch.tensor([r for r in range(R) if (i + r) % 3 != 0])  # rows step at different times
        grads = torch.randn(len(rows), *shape)
        params.grad = torch.zeros_like(params)
        params.grad[rows] = grads
        apply = torch.tensor([not (i == 5 and r == 1) for r in rows.tolist()])  # one skipped step (16-mixed)
        adam.select(rows, [lrs[r] for r in rows.tolist()], apply)
        adam.step()
        for j, r in enumerate(rows.tolist()):
            if apply[j]:
                refs[r].grad = grads[j].clone()
                opts[r].step()
    for r in range(R):
        assert torch.equal(params[r].detach(), refs[r].detach()), r


def test_per_row_adam_equals_torch_adam_on_each_image_alone(random_model, sample_images):
    """Issue criterion: ≤1e-6 relative on every ∅_t after a full T=10 inversion, fp32 CPU, several images in
    one engine against ``torch.optim.Adam`` run on each image alone (the baseline loop, same call structure)."""
    cfg = InversionConfig(num_ddim_steps=10, num_inner_steps=3, image_size=64, batch_invariant=True)
    engine = SlotEngine(random_model, cfg, rows=2)
    out, failed, _ = _run(engine, _admissions(random_model, sample_images, PROMPTS))
    assert not failed and sorted(out) == [0, 1, 2]
    for k, (im, p) in enumerate(zip(sample_images, PROMPTS)):
        base = baseline_invert(
            random_model, prepare_image(im, 64)[None], p, cfg, weights_grad=False, recompute_cond=False
        )
        assert torch.equal(out[k].inner_steps, base.inner_steps)
        for i in range(10):
            got, ref = out[k].null_embeddings[i], base.null_embeddings[i]
            assert (got - ref).norm() <= 1e-6 * ref.norm(), (k, i)


def test_unet_calls_per_timestep(random_model, sample_images):
    calls = {"grad": 0, "no_grad": 0}

    def count(module, args, kwargs):
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1

    handle = random_model.unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        [inv] = invert(random_model, sample_images[:1], PROMPTS[:1], num_inner_steps=3, early_stop=False, **FAST)
    finally:
        handle.remove()
    T = 4
    # pivot: T conditional calls; per timestep: 1 conditional + N with grad + 1 unconditional for z̄_{t-1}
    assert calls["grad"] == T * 3 == int(inv.inner_steps.sum())
    assert calls["no_grad"] == T + T * 2
    assert inv.meta["unet_calls"] == {"pivot": T, "cond": T, "uncond_grad": T * 3, "uncond": T}


def test_every_call_is_full_until_the_tail(random_model, sample_images):
    """2 rows over 3 slots, 6 images: every UNet call carries 2 rows until the stream runs dry."""
    cfg = InversionConfig(num_inner_steps=2, **FAST)
    engine = SlotEngine(random_model, cfg, rows=2)
    images = list(sample_images) * 2
    ticks = [ev for ev in engine.run(_admissions(random_model, images, PROMPTS * 2)) if isinstance(ev, Tick)]
    assert all(t.rows == 2 for t in ticks if t.active == 3)  # pigeonhole: 3 slots, 2 kinds, 2 rows
    assert sum(t.rows == 2 for t in ticks) > 0.6 * len(ticks)
    assert all(t.active < 3 for t in ticks[-5:])  # the short calls are the tail's


def test_only_null_embeddings_learn_and_frozen_weights_get_no_grad(random_model, sample_images):
    """The Lightning module's parameters are exactly the nulls being optimised (∅_t of each slot, with grad), the
    per-row Adam steps exactly them; {∅_t} are buffers; the frozen UNet gets no gradient."""
    engine = SlotEngine(random_model, InversionConfig(**FAST), rows=2)
    S, T, D = engine.num_slots, 4, random_model.text_encoder.config.hidden_size
    params = list(engine.bank.parameters())
    assert sum(p.numel() for p in params) == S * 77 * D and all(p.requires_grad for p in params)
    assert {id(p) for p in engine.adam.params} == {id(p) for p in params}
    assert engine.bank.null_embeddings["prompt_embeds"].shape == (S, T, 77, D)
    invert(random_model, sample_images[:1], PROMPTS[:1], num_inner_steps=1, **FAST)
    assert all(p.grad is None and not p.requires_grad for p in random_model.unet.parameters())


def test_non_finite_image_fails_alone_and_its_slot_is_refilled(random_model, sample_images):
    """The UNet returns NaN on image 1's inner steps: image 1 fails; the others finish with exactly the numbers
    of a run without it (batch_invariant), and the freed slot takes the next image."""
    cfg = InversionConfig(num_inner_steps=2, batch_invariant=True, **FAST)
    adm = _admissions(random_model, list(sample_images) + [sample_images[0]], PROMPTS + ["again"])
    engine = SlotEngine(random_model, cfg, rows=1, slots=2)
    real = engine.denoise

    def poisoned(z, t, cond):
        out = real(z, t, cond)
        slot = next((s for s, st in enumerate(engine.slots) if st is not None and st.tag == 1), None)
        if slot is None or not torch.is_grad_enabled():
            return out
        bad = (z == engine.bank.z_bar[slot]).flatten(1).all(1)
        return torch.where(bad[:, None, None, None], torch.full_like(out, float("nan")), out)

    engine.denoise = poisoned
    out, failed, _ = _run(engine, adm)
    assert list(failed) == [1] and "non-finite" in failed[1]
    assert sorted(out) == [0, 2, 3]  # image 3 entered the slot image 1 left
    clean = SlotEngine(random_model, cfg, rows=1, slots=2)
    ref, _, _ = _run(clean, [a for a in adm if a.tag != 1])
    for k in (0, 2, 3):
        assert torch.equal(out[k].null_embeddings, ref[k].null_embeddings)


def test_engine_state_dict_resumes_bit_for_bit(random_model, sample_images):
    """Default (batched) mode: stop after 7 UNet calls, rebuild the engine from its state, finish — the same
    bits as one uninterrupted run."""
    cfg = InversionConfig(num_inner_steps=3, **FAST)
    adm = _admissions(random_model, sample_images, PROMPTS)
    full, _, _ = _run(SlotEngine(random_model, cfg, rows=2), adm)
    first, _, state = _run(SlotEngine(random_model, cfg, rows=2), adm, stop_after=7)
    assert state is not None and not first
    resumed = SlotEngine(random_model, cfg, rows=2)
    resumed.load_state_dict(state)
    in_flight = set(resumed.tags)
    rest, _, _ = _run(resumed, [a for a in adm if a.tag not in in_flight and a.tag not in first])
    assert sorted(rest) == [0, 1, 2]
    for k in range(3):
        assert torch.equal(rest[k].null_embeddings, full[k].null_embeddings)
        assert torch.equal(rest[k].z_0, full[k].z_0)


def test_replay_lands_on_the_optimisations_z0(tiny_model, sample_images):
    """The dataset run writes z̄_0 of the optimisation as the NTI reconstruction; replaying the sampler from z̄_T
    with {∅_t} (batched branches) gives it again up to rounding (trained tiny model, native size)."""
    [inv] = invert(tiny_model, sample_images[:1], PROMPTS[:1], num_ddim_steps=4, num_inner_steps=2)
    replay = reconstruction_latents(tiny_model, [inv])[0]
    assert (replay - inv.z_0).abs().max() <= 1e-4 * max(1.0, inv.z_0.abs().max().item())


def test_save_load_reconstruct_equals_in_memory(random_model, sample_images, tmp_path):
    [inv] = invert(random_model, sample_images[:1], PROMPTS[:1], num_inner_steps=2, **FAST)
    path = save_inversion(tmp_path / "x", inv, codec=LOSSLESS_CODEC)
    assert path.suffix == ".safetensors" and not list(tmp_path.glob("*.tmp"))
    loaded = load_inversion(path, model=random_model)
    for name in ("z_T", "null_embeddings", "timesteps", "pivot_z0", "inner_steps"):
        assert torch.equal(getattr(loaded, name), getattr(inv, name))
    assert loaded.prompt == inv.prompt and loaded.meta == inv.meta
    assert torch.equal(reconstruction_latents(random_model, [loaded]), reconstruction_latents(random_model, [inv]))


def test_another_model_is_refused(random_model, sample_images, tmp_path):
    [inv] = invert(random_model, sample_images[:1], PROMPTS[:1], num_inner_steps=1, **FAST)
    other = model_from_components(**build_random_components(1), source="tiny-random-1")
    path = save_inversion(tmp_path / "x.safetensors", inv)
    with pytest.raises(IncompatibleInversionError, match="fingerprint"):
        load_inversion(path, model=other)
    with pytest.raises(IncompatibleInversionError):
        reconstruction_latents(other, [inv])
