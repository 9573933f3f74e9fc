"""Algorithm 1 on the random-weight tiny model: batching, early stop, call counts, files, failures."""

import pytest
import torch

from nti_lightning import invert, load_inversion, save_inversion
from nti_lightning.api import reconstruction_latents
from nti_lightning.config import InversionConfig
from nti_lightning.ddim import DDIMSchedule
from nti_lightning.inversion import IncompatibleInversionError
from nti_lightning.models import model_from_components
from nti_lightning.models.tiny import build_random_components
from nti_lightning.nulltext import NullTextInversionModule, optimize_null_text

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


def test_batched_equals_one_at_a_time_with_mixed_early_stop(random_model, sample_images):
    eps = _mixed_epsilon(random_model, sample_images)
    kw = dict(num_inner_steps=4, early_stop_epsilon=eps, early_stop_slope=0.0, batch_invariant=True, **FAST)
    batched = invert(random_model, sample_images, PROMPTS, batch_size=3, **kw)
    singles = [invert(random_model, [im], [p], **kw)[0] for im, p in zip(sample_images, PROMPTS)]
    steps = torch.stack([inv.inner_steps for inv in batched])  # (3, T)
    assert len(set(steps.sum(1).tolist())) > 1, "early stop must differ between the images"
    assert steps.min() >= 1 and steps.max() == 4
    for b, s in zip(batched, singles):
        assert torch.equal(b.inner_steps, s.inner_steps)
        assert (b.null_embeddings - s.null_embeddings).abs().max() <= 1e-5
        assert (b.z_0 - s.z_0).abs().max() <= 1e-5
        assert torch.equal(b.z_T, s.z_T)


def test_stopped_image_embeddings_never_move_again(random_model, sample_images):
    eps = _mixed_epsilon(random_model, sample_images)
    [inv_stop] = [
        inv
        for inv in invert(
            random_model,
            sample_images,
            PROMPTS,
            batch_size=3,
            num_inner_steps=3,
            early_stop_epsilon=eps,
            early_stop_slope=0.0,
            **FAST,
        )
        if inv.inner_steps[0] == 1
    ][:1]
    # one Adam step from ψ("") at the first timestep: every element moved by at most lr (Adam's bound)
    from nti_lightning.text import encode_null

    moved = (inv_stop.null_embeddings[0] - encode_null(random_model)[0]).abs()
    assert moved.max() <= 1e-2 * (1 + 1e-5)


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
    assert inv.meta["unet_calls"] == {"cond": T, "uncond_grad": T * 3, "uncond": T}


def test_authors_structure_recomputes_the_conditional_branch(random_model, sample_images):
    fast = invert(random_model, sample_images[:1], PROMPTS[:1], num_inner_steps=2, **FAST)[0]
    slow = invert(
        random_model, sample_images[:1], PROMPTS[:1], num_inner_steps=2, skip_redundant_unet_calls=False, **FAST
    )[0]
    assert slow.meta["unet_calls"]["cond"] == 2 * fast.meta["unet_calls"]["cond"]
    # same optimisation up to the last step's arithmetic: the embeddings of the first timestep agree exactly
    assert torch.equal(fast.null_embeddings[0], slow.null_embeddings[0])


def test_only_null_embeddings_learn_and_frozen_weights_get_no_grad(random_model, sample_images):
    module = NullTextInversionModule(torch.zeros(2, 77, 32), num_steps=5)
    assert sum(p.numel() for p in module.parameters()) == 5 * 2 * 77 * 32
    invert(random_model, sample_images[:1], PROMPTS[:1], num_inner_steps=1, **FAST)
    assert all(p.grad is None and not p.requires_grad for p in random_model.unet.parameters())


def test_non_finite_loss_marks_the_image_failed_and_others_go_on():
    T, B = 3, 3
    schedule = DDIMSchedule(
        timesteps=torch.tensor([801, 401, 1]),
        alphas_cumprod=torch.linspace(0.99, 0.01, 1000),
        final_alpha_cumprod=torch.tensor(0.99),
        num_train_timesteps=1000,
    )

    def denoiser(z, t, ctx):  # a smooth fake ε that blows up for image 1's latent
        eps = 0.1 * z + ctx.mean(dim=(1, 2))[:, None, None, None]
        return torch.where(z.abs().amax(dim=(1, 2, 3), keepdim=True) > 50, torch.full_like(z, float("nan")), eps)

    traj = torch.randn(T + 1, B, 4, 2, 2)
    traj[T, 1] += 100.0  # image 1's z*_T
    module = NullTextInversionModule(torch.zeros(B, 5, 4), T)
    state = optimize_null_text(
        module, denoiser, schedule, traj, torch.ones(B, 5, 4), InversionConfig(num_ddim_steps=T, num_inner_steps=2)
    )
    assert state.failed.tolist() == [False, True, False]
    assert torch.isfinite(module.stacked()[:, [0, 2]]).all()
    assert state.inner_steps[:, 0].tolist() == [2, 2, 2] and state.inner_steps[:, 1].sum() == 0


def test_save_load_reconstruct_equals_in_memory(random_model, sample_images, tmp_path):
    [inv] = invert(random_model, sample_images[:1], PROMPTS[:1], num_inner_steps=2, **FAST)
    path = save_inversion(tmp_path / "x", inv)
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
