"""Guidance math of NPI, ProxNPI and Direct Inversion."""

from __future__ import annotations

import pytest
import torch

from nti_lightning.engine.guidance import (
    ProxParams,
    apply_direct_inversion,
    direct_inversion_offset,
    inversion_guidance,
    npi_null,
    prox_threshold,
    proximal_delta,
    proximal_guidance,
    slerp,
)


def test_npi_null_is_the_source_embedding():
    cond, unc = torch.randn(1, 77, 8), torch.randn(1, 77, 8)
    null = npi_null(cond)
    assert torch.equal(null, cond) and null.data_ptr() != cond.data_ptr()
    assert torch.allclose(npi_null(cond, unc, 1.0), unc, atol=1e-5)
    with pytest.raises(ValueError):
        npi_null(cond, None, 0.5)


def test_slerp_endpoints_and_norm():
    a, b = torch.randn(2, 10), torch.randn(2, 10)
    assert torch.allclose(slerp(0.0, a, b), a, atol=1e-5) and torch.allclose(slerp(1.0, a, b), b, atol=1e-5)
    u, v = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    assert torch.allclose(slerp(0.3, u, v).norm(dim=1), torch.ones(2), atol=1e-5)


def test_proximal_delta_matches_the_authors_formulas():
    d = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    tau = torch.tensor(1.0)
    assert torch.equal(proximal_delta(d, tau, "l0"), torch.tensor([-2.0, 0, 0, 0, 0, 0, 2.0]))
    assert torch.equal(proximal_delta(d, tau, "l1"), torch.tensor([-1.0, 0, 0, 0, 0, 0, 1.0]))
    with pytest.raises(ValueError):
        proximal_delta(d, tau, "l2")


def test_threshold_is_a_quantile_over_the_whole_batch_or_fixed():
    d = torch.arange(100, dtype=torch.float32).reshape(2, 1, 5, 10) - 50
    assert prox_threshold(d, 0.5).item() == pytest.approx(d.abs().flatten().quantile(0.5).item())
    assert prox_threshold(d, -0.2).item() == pytest.approx(0.2)


def test_proximal_guidance_keeps_only_large_differences():
    torch.manual_seed(0)
    eps_u = (torch.randn(2, 4, 16, 16) * 64).round() / 64  # a binary grid: ε_cond − ε_uncond is exact
    delta = torch.full_like(eps_u, 1 / 64)
    delta[1, :, 4:8, 4:8] = 5.0  # the target branch differs much only in one square
    eps, mask = proximal_guidance(eps_u, eps_u + delta, w=7.5, params=ProxParams(quantile=0.9, dilate=0))
    assert torch.equal(eps[0], eps_u[0])  # differences at or below τ (here 1/64) are removed
    assert torch.allclose(eps[1, :, 4:8, 4:8], eps_u[1, :, 4:8, 4:8] + 7.5 * (5.0 - 1 / 64))
    assert mask[1, :, 4:8, 4:8].all() and mask[0].sum() == 0 and mask[1].sum() == 4 * 16
    _, dilated = proximal_guidance(eps_u, eps_u + delta, w=7.5, params=ProxParams(quantile=0.9, dilate=1))
    assert dilated[1].sum() == 4 * 36


def test_inversion_guidance_replaces_the_unedited_region_below_recon_t():
    z, z_star = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = torch.zeros(2, 4, 8, 8)
    mask[:, :, :4] = 1
    out = inversion_guidance(z, z_star, mask, t=300)
    assert torch.equal(out[:, :, :4], z[:, :, :4])
    assert torch.allclose(out[:, :, 4:], z_star.expand(2, -1, -1, -1)[:, :, 4:])
    assert torch.equal(inversion_guidance(z, z_star, mask, t=500), z)
    half = inversion_guidance(z, z_star, mask, t=300, params=ProxParams(recon_lr=0.5))
    assert torch.allclose(half[:, :, 4:], (z + 0.5 * (z_star - z))[:, :, 4:])


def test_direct_inversion_offset_reproduces_z_star():
    torch.manual_seed(0)
    z_star, z = torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8)
    offset = direct_inversion_offset(z_star, z[:1])
    out = apply_direct_inversion(z, offset)
    # a + (b − a) is b up to one rounding step in floating point
    assert torch.allclose(out[:1], z_star, rtol=0, atol=4 * torch.finfo(torch.float32).eps * z_star.abs().max())
    assert torch.equal(out[1:], z[1:])  # the target branch is untouched
    # exact where no rounding occurs (values on a coarse binary grid)
    zq, zsq = (z * 64).round() / 64, (z_star * 64).round() / 64
    assert torch.equal(apply_direct_inversion(zq, direct_inversion_offset(zsq, zq[:1]))[:1], zsq)
