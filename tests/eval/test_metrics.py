"""PIE-Bench metrics: known values, torchmetrics agreement, masks, tiny random local networks (never downloaded)."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from nti_lightning.eval.metrics import (
    Backbones,
    clip_image_similarity,
    clip_score,
    load_clip,
    load_dino,
    load_lpips,
    load_nets,
    mse,
    pie_metrics,
    psnr,
    ssim,
    structure_distance,
)

torch.set_num_threads(1)


def _images(b=2, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g), torch.rand(b, 3, h, w, generator=g)


def test_psnr_and_mse_known_values():
    a = torch.full((1, 3, 8, 8), 0.5)
    assert mse(a + 0.1, a).item() == pytest.approx(0.01, rel=1e-5)
    assert psnr(a + 0.1, a).item() == pytest.approx(20.0, abs=1e-4)
    assert math.isinf(psnr(a, a).item())
    x, y = _images(1)
    assert psnr(x, y).item() == pytest.approx(PeakSignalNoiseRatio(data_range=1.0)(x, y).item(), abs=1e-4)


def test_psnr_is_per_image():
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    b[0] += 0.1
    b[1] += 0.01
    assert torch.allclose(psnr(b, a), torch.tensor([20.0, 40.0]), atol=1e-3)


def test_ssim_matches_torchmetrics():
    x, y = _images(1, 96, 80)
    y = (0.7 * x + 0.3 * y).clamp(0, 1)
    ref = StructuralSimilarityIndexMeasure(data_range=1.0)(x, y).item()
    assert abs(ssim(x, y).item() - ref) < 1e-4


def test_masked_metrics_ignore_the_masked_out_region():
    x, y = _images(1)
    keep = torch.zeros(64, 64)
    keep[:, :32] = 1
    y2 = y.clone()
    y2[..., :32] = x[..., :32]  # agree on the kept half, differ elsewhere
    assert mse(x, y2, keep).item() == 0
    assert math.isinf(psnr(x, y2, keep).item())
    assert ssim(x, y2, keep).item() == pytest.approx(1.0, abs=1e-5)
    y3 = y2.clone()
    y3[..., 32:] = torch.rand(1, 3, 64, 32)  # changing the masked-out part changes nothing
    assert mse(x, y3, keep).item() == 0


def test_empty_region_gives_nan():
    x, y = _images(1)
    none = torch.zeros(64, 64)
    assert math.isnan(psnr(x, y, none).item()) and math.isnan(ssim(x, y, none).item())


def test_missing_backbones_skip_with_one_line_each(caplog):
    with caplog.at_level(logging.INFO, logger="nti_lightning.eval.metrics"):
        nets = load_nets(Backbones())
    assert nets.lpips is None and nets.dino is None and nets.clip is None
    assert len(caplog.records) == 3 and all("skipped" in r.getMessage() for r in caplog.records)
    x, y = _images(1, 32, 32)
    out = pie_metrics(x, y, np.zeros((32, 32), bool), "a cat", nets)
    assert set(out) == {"psnr_bg", "mse_bg", "ssim_bg"}


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    path = tmp_path_factory.mktemp("vit")
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return load_dino(Backbones(dino=path))


def test_structure_distance_tiny_vit(tiny_vit):
    x, y = _images(2)
    d_same = structure_distance(x, x, tiny_vit, size=32)
    d = structure_distance(x, y, tiny_vit, size=32)
    assert torch.equal(d_same, torch.zeros(2))
    assert torch.isfinite(d).all() and (d > 0).all()
    assert torch.isfinite(structure_distance(x, y, tiny_vit, size=48)).all()  # position embeddings interpolated


def _write_tokenizer(path, words):
    toks, merges = ["<|startoftext|>", "<|endoftext|>"], []
    for w in words:
        cur = list(w[:-1]) + [w[-1] + "</w>"]
        toks += cur
        while len(cur) > 1:
            merges.append((cur[0], cur[1]))
            cur = [cur[0] + cur[1]] + cur[2:]
            toks.append(cur[0])
    toks, merges = list(dict.fromkeys(toks)), list(dict.fromkeys(merges))
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(toks)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(toks)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    path = tmp_path_factory.mktemp("clip")
    vocab = _write_tokenizer(path, ["a", "red", "blue", "car", "cat", "on", "the", "road"])
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    return load_clip(Backbones(clip=path))


def test_clip_tiny_random(tiny_clip):
    x, y = _images(2)
    s = clip_score(x, ["a red car", "a cat on the road"], tiny_clip)
    assert s.shape == (2,) and torch.isfinite(s).all() and (s >= 0).all() and (s <= 100).all()
    assert torch.allclose(clip_score(x, ["a red car"] * 2, tiny_clip)[:1], s[:1], atol=1e-5)
    assert torch.allclose(clip_image_similarity(x, x, tiny_clip), torch.ones(2), atol=1e-5)
    keep = torch.zeros(64, 64)
    keep[16:48, 16:48] = 1
    assert torch.isfinite(clip_score(x, ["a blue car"] * 2, tiny_clip, keep)).all()


def test_pie_metrics_with_tiny_networks(tiny_vit, tiny_clip):
    from nti_lightning.eval.metrics import Nets

    x, y = _images(1, 32, 32)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    out = pie_metrics(x, y, mask, "a red car", Nets(dino=tiny_vit, clip=tiny_clip))
    assert {"structure_distance", "clip_whole", "clip_edited", "psnr_bg"} <= set(out)
    assert all(math.isfinite(v) for v in out.values())
    same = pie_metrics(x, x, mask, "a red car", Nets(dino=tiny_vit, clip=tiny_clip))
    assert same["structure_distance"] == 0 and same["mse_bg"] == 0


def test_lpips_without_torchvision_is_skipped_with_one_line(tmp_path, caplog):
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision is installed")
    except ImportError:
        pass
    torch.save({}, tmp_path / "b.pth")
    with caplog.at_level(logging.INFO, logger="nti_lightning.eval.metrics"):
        assert load_lpips(Backbones(lpips=tmp_path / "b.pth")) is None
    assert len(caplog.records) == 1 and "torchvision" in caplog.records[0].getMessage()
