import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from nti_lightning.engine.ddim import (
    classifier_free_guidance,
    ddim_inverse_step,
    ddim_step,
    ddim_transition,
    schedule_from_scheduler,
)
from nti_lightning.engine.nulltext import early_stop_threshold, latent_mse, null_text_lr

SD1_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


@pytest.fixture
def schedule():
    return schedule_from_scheduler(DDIMScheduler(**SD1_SCHEDULER), 50)


def test_sd1_timesteps_are_the_authors(schedule):
    assert schedule.timesteps[0] == 981 and schedule.timesteps[-1] == 1
    assert torch.equal(schedule.timesteps, torch.arange(981, 0, -20))
    assert schedule.step_ratio == 20


def test_final_alpha_below_timestep_zero(schedule):
    # set_alpha_to_one=False: the step below t=1 uses ᾱ[0], not 1
    assert schedule.alpha(-19) == schedule.alphas_cumprod[0]
    assert float(schedule.alpha(-19)) < 1.0
    one = schedule_from_scheduler(DDIMScheduler(**{**SD1_SCHEDULER, "set_alpha_to_one": True}), 50)
    assert float(one.alpha(-19)) == 1.0


def test_without_steps_offset_timesteps_shift():
    s = schedule_from_scheduler(DDIMScheduler(**{**SD1_SCHEDULER, "steps_offset": 0}), 50)
    assert s.timesteps[0] == 980 and s.timesteps[-1] == 0


@pytest.mark.parametrize("t", [981, 501, 21, 1])
def test_ddim_step_matches_diffusers_bitwise(schedule, t):
    g = torch.Generator().manual_seed(t)
    z, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sched = DDIMScheduler(**SD1_SCHEDULER)
    sched.set_timesteps(50)
    expected = sched.step(eps, t, z, eta=0.0).prev_sample
    assert torch.equal(ddim_step(schedule, z, eps, t), expected)


@pytest.mark.parametrize("t", [981, 501, 1])
def test_inverse_then_forward_returns_the_latent(schedule, t):
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    up = ddim_inverse_step(schedule, z, eps, t)
    assert not torch.allclose(up, z)
    assert torch.allclose(ddim_step(schedule, up, eps, t), z, atol=1e-5, rtol=1e-5)


def test_inverse_step_uses_destination_alpha(schedule):
    # z*_t = √ᾱ_t x̂0 + √(1-ᾱ_t) ε with x̂0 from the previous level ᾱ[t-20]
    z, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    a_prev, a_t = schedule.alphas_cumprod[481], schedule.alphas_cumprod[501]
    x0 = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
    assert torch.allclose(ddim_inverse_step(schedule, z, eps, 501), a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps, atol=1e-6)


def test_transition_between_equal_levels_is_identity():
    z, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    a = torch.tensor(0.3)
    assert torch.allclose(ddim_transition(z, eps, a, a), z, atol=1e-6)


def test_guidance_combination():
    u, c = torch.randn(2, 4), torch.randn(2, 4)
    assert torch.equal(classifier_free_guidance(u, c, 1.0), u + (c - u))
    assert torch.allclose(classifier_free_guidance(u, c, 7.5), -6.5 * u + 7.5 * c, atol=1e-6)


def test_lr_schedule_and_its_guard():
    assert null_text_lr(1e-2, 0, 100) == 1e-2
    assert null_text_lr(1e-2, 49, 100) == pytest.approx(0.0051)
    with pytest.raises(ValueError, match="lr_decay_horizon"):
        null_text_lr(1e-2, 100, 100)


def test_early_stop_threshold():
    assert early_stop_threshold(1e-5, 2e-5, 0) == 1e-5
    assert early_stop_threshold(1e-5, 2e-5, 10) == pytest.approx(2.1e-4)


def test_latent_mse_is_per_image_mse():
    a, b = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    per = latent_mse(a, b)
    assert per.shape == (3,)
    for k in range(3):
        assert per[k].item() == pytest.approx(F.mse_loss(a[k], b[k]).item(), rel=1e-6)
