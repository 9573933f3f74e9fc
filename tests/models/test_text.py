import pytest
import torch

from nti_lightning.text import PromptError, check_prompt, encode_null, encode_text


def test_long_prompt_is_refused_not_truncated(random_model):
    tok = random_model.tokenizer
    with pytest.raises(PromptError, match="over the tokenizer's limit of 77"):
        check_prompt(tok, " ".join(["cat"] * 100))
    assert check_prompt(tok, "a photo of a cat") == "a photo of a cat"


def test_empty_and_missing_prompts(random_model):
    with pytest.raises(PromptError, match="empty prompt"):
        check_prompt(random_model.tokenizer, "   ")
    with pytest.raises(PromptError, match="missing caption"):
        check_prompt(random_model.tokenizer, None)


def test_embeddings_shapes_and_null(random_model):
    cond = encode_text(random_model, ["a cat", "a dog"])
    L = random_model.tokenizer.model_max_length
    assert cond.shape == (2, L, random_model.text_encoder.config.hidden_size)
    null = encode_null(random_model, 2)
    assert torch.equal(null[0], null[1]) and torch.equal(null[:1], encode_text(random_model, [""]))
    assert not torch.allclose(cond[0], null[0])
