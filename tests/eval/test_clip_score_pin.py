"""Why ``eval.metrics.clip_score`` is not torchmetrics' ``CLIPScore`` (which PIE-Bench's code calls), pinned:
torchmetrics 1.9's CLIPScore normalises ``model.get_image_features(...)`` as a tensor, and transformers 5 returns a
``BaseModelOutputWithPooling`` there (the projection in ``pooler_output``), so CLIPScore raises on any CLIPModel.
Given CLIPScore the tensors it expects (the features transformers 4 returned), it gives our numbers exactly: ours
are PIE-Bench's."""

from __future__ import annotations

import pytest
import torch
from test_metrics import _write_tokenizer  # the tiny CLIP tokenizer of the metric tests
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from nti_lightning.eval.metrics import Backbones, clip_score, load_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    vocab = _write_tokenizer(path, ["a", "red", "blue", "car", "cat", "on", "the", "road"])
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    return load_clip(Backbones(clip=path))


class _FeatureTensors(torch.nn.Module):
    """The CLIPModel as torchmetrics' CLIPScore reads it: get_*_features return the projected (B, D) tensors."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _per_image(metric, images, texts):
    out = []
    for im, text in zip(images, texts):  # PIE-Bench: one image per call, uint8 CHW
        metric.reset()
        metric.update((im.clamp(0, 1) * 255).round().to(torch.uint8)[None], [text])
        out.append(float(metric.compute()))
    return out


def test_torchmetrics_clipscore_cannot_read_transformers_5_features(clip):
    processor = CLIPProcessor(image_processor=clip.processor, tokenizer=clip.tokenizer)
    metric = CLIPScore(model_name_or_path=lambda: (clip.model, processor))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    try:
        metric.update((images * 255).to(torch.uint8), ["a red car"])
    except AttributeError as e:
        assert "'BaseModelOutputWithPooling' object has no attribute 'norm'" in str(e)
    else:
        pytest.fail("torchmetrics' CLIPScore reads this transformers' CLIPModel now: use it in eval.metrics.clip_score")


def test_clip_score_is_torchmetrics_clipscore_numbers(clip):
    processor = CLIPProcessor(image_processor=clip.processor, tokenizer=clip.tokenizer)
    metric = CLIPScore(model_name_or_path=lambda: (_FeatureTensors(clip.model), processor))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    texts = ["the cat", "red road"]  # scores above 0 (the clamp) on this random model, whole and masked
    whole = clip_score(x, texts, clip).tolist()
    assert min(whole) > 10 and whole == pytest.approx(_per_image(metric, x, texts), abs=1e-4)
    keep = torch.zeros(64, 64)
    keep[16:48, 16:48] = 1  # PIE's edited-region score: the image times the mask
    masked = clip_score(x, texts, clip, keep).tolist()
    assert min(masked) > 1 and masked == pytest.approx(_per_image(metric, x * keep, texts), abs=1e-4)
    assert (
        clip_score(x, ["a cat on the road"] * 2, clip).tolist()
        == [0.0, 0.0]
        == _per_image(metric, x, ["a cat on the road"] * 2)
    )
