"""One PSNR in the package: torchmetrics' public ``peak_signal_noise_ratio`` per image (``metrics.psnr_per_image``),
used by the run's metrics (``metrics.image_metrics``) and by PIE-Bench's masked PSNR (``eval.metrics.psnr``)."""

from __future__ import annotations

import math

import torch
from torchmetrics.image import PeakSignalNoiseRatio

import nti_lightning.metrics as run_metrics
from nti_lightning.eval.metrics import psnr
from nti_lightning.metrics import image_metrics, psnr_per_image


def _pair(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 40, 48, generator=g)
    return x, (x + 0.05 * torch.randn(b, 3, 40, 48, generator=g)).clamp(0, 1)


def test_both_call_sites_go_through_torchmetrics(monkeypatch):
    calls = []
    real = run_metrics.peak_signal_noise_ratio

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_metrics, "peak_signal_noise_ratio", counting)
    x, y = _pair()
    psnr(x, y)
    image_metrics(x[0] * 2 - 1, y[0] * 2 - 1)
    assert len(calls) == 2 and all(c["data_range"] == 1.0 and c["dim"] == (1, 2, 3) for c in calls)


def test_the_two_give_one_number_and_torchmetrics_class_agrees():
    x, y = _pair()
    per_image = psnr(x, y)
    for k in range(2):
        assert image_metrics(x[k] * 2 - 1, y[k] * 2 - 1)["psnr"] == float(per_image[k])
        assert float(per_image[k]) == float(PeakSignalNoiseRatio(data_range=1.0)(x[k : k + 1], y[k : k + 1]))
    assert torch.equal(per_image, psnr_per_image(x, y))


def test_masked_psnr_is_psnr_of_the_masked_images_and_nan_when_empty():
    x, y = _pair(1, 1)
    keep = torch.zeros(40, 48)
    keep[:, :20] = 1
    assert torch.equal(psnr(x, y, keep), psnr_per_image(x * keep, y * keep))
    assert math.isnan(psnr(x, y, torch.zeros(40, 48)).item()) and math.isinf(psnr(x, x).item())
