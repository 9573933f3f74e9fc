"""SD2's text side (issue #16): an OpenCLIP-style tokenizer padding with "!" (≠ <|endoftext|>), built locally
from the tiny vocabulary; ψ("") the model's own way, the prompt length limit and P2P's word ↔ token alignment."""

from __future__ import annotations

import pytest
import torch

from nti_lightning.models import model_from_components
from nti_lightning.models.tiny import EOS_TOKEN_ID, build_random_family_components, build_tokenizer
from nti_lightning.p2p import alignment as al
from nti_lightning.text import PromptError, check_prompt, encode_text


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(pad_token="!")


@pytest.fixture(scope="module")
def sd2():
    return model_from_components(**build_random_family_components("sd2", 0), source="tiny-sd2-random")


def test_pad_is_bang_not_eos(tok):
    assert tok.pad_token == "!" and tok.pad_token_id == 0 and tok.pad_token_id != tok.eos_token_id
    ids = tok("", padding="max_length", max_length=77).input_ids
    assert ids[:3] == [tok.bos_token_id, EOS_TOKEN_ID, 0] and set(ids[2:]) == {0} and len(ids) == 77


def test_null_is_the_pipelines_negative_embedding(sd2):
    """ψ("") computed the model's own way: diffusers' encode_prompt for the empty negative prompt."""
    with torch.no_grad():
        pos, neg = sd2.pipeline.encode_prompt("a photo of a cat", "cpu", 1, True)
    assert torch.equal(sd2.family.null(sd2)["prompt_embeds"], neg)
    assert torch.equal(sd2.family.encode_prompts(sd2, ["a photo of a cat"])["prompt_embeds"], pos)
    assert neg.shape == (1, 77, 48)  # SD2's wider text (1024 for the real model)


def test_prompt_length_limit_counts_start_and_end(sd2, tok):
    word_ids = tok("cat", add_special_tokens=False).input_ids
    assert len(word_ids) == 1
    check_prompt(tok, " ".join(["cat"] * 75))  # 75 + start + end = 77
    with pytest.raises(PromptError, match="78 tokens"):
        check_prompt(tok, " ".join(["cat"] * 76))
    assert encode_text(sd2, [" ".join(["cat"] * 75)]).shape == (1, 77, 48)


def test_words_with_bang_align(tok):
    """ "!" is the pad token and an ordinary character of a prompt: its spans still tile the tokenisation."""
    words = al.prompt_words(tok, "a cat! sitting")
    assert [w.text for w in words] == ["a", "cat!", "sitting"]
    assert words[1].core == (2,) and words[1].positions == (2, 3) and words[2].positions == (4,)
    assert al.word_token_indices(tok, "a cat! sitting", "cat") == [2]
    assert al.token_labels(tok, "a cat!") == ["<start>", "a", "cat", "!", "<end>"]


def test_replacement_and_refinement_with_bang_pad(tok):
    source, target = "a photo of a cat!", "a photo of an astronaut!"
    mapper = al.replacement_mapper(tok, source, target)
    assert mapper.shape == (77, 77)
    cat, astro = al.prompt_words(tok, source)[4], al.prompt_words(tok, target)[4]  # "cat!", "astronaut!"
    assert len(astro.positions) > len(astro.core) > 1 and al.word_token_indices(tok, target, "astronaut") == list(
        astro.core
    )
    n = len(astro.positions)
    assert torch.allclose(mapper[cat.positions[0], list(astro.positions)], torch.full((n,), 1 / n))
    # end and "!" padding map in order, to the last position
    n_s, n_t = al.prompt_length(al.prompt_words(tok, source)), al.prompt_length(al.prompt_words(tok, target))
    assert all(mapper[i, j] == 1 for i, j in zip(range(n_s - 1, 77), range(n_t - 1, 77)))
    assert torch.allclose(mapper.sum(1)[: 77 - (n_t - n_s)], torch.ones(77 - (n_t - n_s)))
    index, alphas = al.refinement_mapper(tok, "a cat!", "a black cat!")
    black = al.word_token_indices(tok, "a black cat!", "black")
    assert alphas[black].eq(0).all() and alphas.sum() == 77 - len(black)
