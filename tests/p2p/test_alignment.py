"""``p2p.alignment``: words ↔ token positions, word-swap and refinement alignments (P2P §3.2)."""

from __future__ import annotations

import pytest
import torch

from nti_lightning.p2p import AlignmentError, WordNotInPromptError
from nti_lightning.p2p import alignment as al

from .helpers import SOURCE, n_tokens


def test_word_positions_punctuation_and_phrases(tok):
    prompt = "A photo of a Zebra. next to a zebra"
    n_photo = n_tokens(tok, "photo")
    assert al.word_token_indices(tok, prompt, "photo") == list(range(2, 2 + n_photo))
    zebra = al.word_token_indices(tok, prompt, "zebra")  # both occurrences, without the "."
    words = al.prompt_words(tok, prompt)
    assert zebra == list(words[4].core) + list(words[8].core)
    assert len(words[4].positions) == len(words[4].core) + 1  # "." is its own token
    assert al.word_token_indices(tok, prompt, "a photo") == [1, *range(2, 2 + n_photo)]
    with pytest.raises(WordNotInPromptError, match="'horse' is not in the prompt"):
        al.word_token_indices(tok, prompt, "horse")


def test_replacement_mapper_single_and_multi_token(tok):
    m = al.replacement_mapper(tok, SOURCE, "a dog sitting next to a mirror")
    assert n_tokens(tok, "cat") == n_tokens(tok, "dog") == 1
    assert torch.equal(m, torch.eye(77))  # one token for one, the rest in place
    word = "xylophonist"
    k = n_tokens(tok, word)
    assert k > 1
    m = al.replacement_mapper(tok, SOURCE, f"a {word} sitting next to a mirror")
    assert torch.equal(m[2, 2 : 2 + k], torch.full((k,), 1.0 / k))  # "cat" spread over the k tokens
    assert m[3, 2 + k] == 1 and m[8, 7 + k] == 1  # "sitting" and the end token shift by k - 1
    fed = torch.ones(77 - (k - 1))
    fed[2 : 2 + k] = 1.0 / k
    assert torch.equal(m.sum(0)[: 77 - (k - 1)], fed)  # every other target column fed once, in order
    with pytest.raises(AlignmentError, match="same number of words"):
        al.replacement_mapper(tok, SOURCE, "a cat sitting next to a silver mirror")


def test_refinement_alignment_insertions(tok):
    target = "a silver cat sitting next to a mirror"
    mapper, alphas = al.refinement_mapper(tok, SOURCE, target)
    n_src = len(tok(SOURCE).input_ids)  # with start and end
    s = n_tokens(tok, "silver")
    inserted = list(range(2, 2 + s))
    assert alphas[inserted].eq(0).all() and alphas.sum() == 77 - s
    assert mapper[0] == 0 and mapper[1] == 1  # start, "a"
    assert mapper[2 + s : n_src + s].tolist() == list(range(2, n_src))  # "cat" … end token, shifted by s
    assert mapper[76].item() == 76 - s  # padding follows the end token


def test_refinement_alignment_multi_token_words(tok):
    word = "xylophonist"
    k = n_tokens(tok, word)
    source = f"a {word} next to a mirror"
    target = f"a red {word} next to a {word} mirror"
    mapper, alphas = al.refinement_mapper(tok, source, target)
    r = n_tokens(tok, "red")
    kept = list(range(2 + r, 2 + r + k))
    assert mapper[kept].tolist() == list(range(2, 2 + k)) and alphas[kept].eq(1).all()  # token by token
    second = al.prompt_words(tok, target)[6]
    assert second.key == word and alphas[list(second.positions)].eq(0).all()  # the inserted copy is new
    matrix = al.refinement_matrix(mapper, alphas)
    assert torch.equal(matrix.sum(0), alphas)


def test_refinement_needs_source_words_in_order(tok):
    with pytest.raises(AlignmentError, match=r"lacks \['cat'\]"):
        al.refinement_mapper(tok, SOURCE, "a dog sitting next to a big mirror")
