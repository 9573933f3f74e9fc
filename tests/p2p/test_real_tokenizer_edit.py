"""A Prompt-to-Prompt edit end to end with the real CLIP tokenizer (``models/clip_vocab.py``): a seeded random
tiny model whose text encoder reads CLIP's 49,408-token vocabulary. Random weights: equalities only."""

from __future__ import annotations

import pytest
import torch

from nti_lightning.models import clip_vocab
from nti_lightning.p2p import EditSpec, edit
from nti_lightning.p2p.edit import build_controller

from .helpers import make_inversion


@pytest.fixture(scope="module")
def clip_model():
    from transformers import CLIPTextConfig, CLIPTextModel

    from nti_lightning.models import model_from_components
    from nti_lightning.models.tiny import TEXT_ENCODER_CONFIG, build_random_components

    parts = build_random_components(0, tokenizer=clip_vocab.clip_tokenizer())
    ids = {"bos_token_id": clip_vocab.BOS_TOKEN_ID, "eos_token_id": clip_vocab.EOS_TOKEN_ID}
    config = {**TEXT_ENCODER_CONFIG, "vocab_size": clip_vocab.VOCAB_SIZE, **ids, "pad_token_id": ids["eos_token_id"]}
    torch.manual_seed(2)
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**config)).eval()
    return model_from_components(**parts, source="tiny-random-clip-vocab")


def test_word_swap_with_local_blend_on_a_multi_token_word(clip_model):
    inv = make_inversion(clip_model, prompt="a smiling kangaroo in a Parisian café")
    target = "a frowning kangaroo in a Parisian café"
    result = edit(clip_model, inv, target, blend_words=["kangaroo"], return_attention=True)
    assert result.modes == ["replace"]
    assert result.token_labels[1][:6] == ["<start>", "a", "fro", "w", "ning", "kangaroo"]
    assert result.blend_mask is not None and result.blend_mask.shape == (1, 1, 8, 8)
    assert result.attention.shape[-1] == 77
    controller, _ = build_controller(clip_model.tokenizer, inv.prompt, [EditSpec(target)], 4, (8, 8))
    assert torch.equal(controller.mapper[0, 2, 2:5], torch.full((3,), 1.0 / 3))  # "smiling" feeds fro, w, ning
    same = edit(clip_model, inv, "A Smiling Kangaroo in a parisian café")  # the same tokens: nothing to edit
    assert same.modes == [None] and torch.equal(same.latents[1], same.latents[0])
    other = edit(clip_model, inv, "a smiling quokka in a Parisian café", blend_words=["quokka"])
    assert other.modes == ["replace"]
    assert torch.equal(other.latents[0], result.latents[0])  # the source row does not depend on the edit
