"""Words ↔ token positions, and the token alignments Prompt-to-Prompt needs between two prompts.

Cross-attention maps have one column per token position of the padded prompt (77 for CLIP): position 0 is
the start token, the prompt's tokens follow, then the end token and padding. A word may be several BPE tokens
(``astronaut`` → ``a st ro na u t</w>`` in the tiny model's vocabulary), so every rule that names words works
on their token spans, which are read from the model's own tokenizer.

- ``replacement_mapper`` (word swap, P2P §3.2): prompts with the same number of words; a swapped word's
  source tokens map onto its target tokens (spread evenly when their counts differ), every other position
  maps one-to-one, in order.
- ``refinement_mapper`` (adding a phrase, P2P §3.2, "A(j)"): the source words must appear in the target in
  order (a word-level longest common subsequence); target tokens of inserted words have A(j) = None.

Words are whitespace-separated; they are matched case-insensitively with leading/trailing punctuation
ignored ("Bicycle." matches ``bicycle``), and a matched word's span excludes that punctuation's tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


class AlignmentError(ValueError):
    """Two prompts whose words cannot be aligned for the chosen edit; the message says why and what to do."""


class WordNotInPromptError(ValueError):
    """A blend / reweight / cross-replace word that is not in the prompt it must be found in."""


_EDGES = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


@dataclass(frozen=True)
class Word:
    """One whitespace-separated word of a prompt and where its tokens sit in the padded sequence."""

    text: str  # as written
    key: str  # matching key: lower case, leading/trailing punctuation removed
    positions: tuple[int, ...]  # all its token positions (position 0 is the start token)
    core: tuple[int, ...]  # the positions of its letters/digits, without edge punctuation


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def word_key(text: str) -> str:
    lead, core, trail = _EDGES.match(text.lower()).groups()
    return core or text.lower()


def prompt_words(tokenizer, prompt: str) -> list[Word]:
    """The prompt's words with their token positions; checks they tile the prompt's tokenisation."""
    full = _tokens(tokenizer, prompt)
    words: list[Word] = []
    pos = 1  # after the start token
    for text in prompt.split():
        ids = _tokens(tokenizer, text)
        positions = tuple(range(pos, pos + len(ids)))
        lead, core, trail = _EDGES.match(text).groups()
        core_positions = positions
        if core and (lead or trail):
            n_lead, n_core = len(_tokens(tokenizer, lead)) if lead else 0, len(_tokens(tokenizer, core))
            pieces = (_tokens(tokenizer, lead) if lead else []) + _tokens(tokenizer, core)
            pieces += _tokens(tokenizer, trail) if trail else []
            if pieces == ids:
                core_positions = positions[n_lead : n_lead + n_core]
        words.append(Word(text, word_key(text), positions, core_positions))
        pos += len(ids)
    if [i for w in words for i in _tokens(tokenizer, w.text)] != full:
        raise AlignmentError(
            f"prompt {prompt!r}: the tokenizer does not split it at whitespace (its tokens are not the "
            "concatenation of its words' tokens), so word positions cannot be found; simplify the punctuation"
        )
    return words


def same_prompt(tokenizer, a: str, b: str) -> bool:
    """Whether two prompts are one prompt to the model: the same token ids (CLIP lower-cases and collapses
    whitespace, so "A Cat" and "a  cat" are the prompt "a cat")."""
    return _tokens(tokenizer, a) == _tokens(tokenizer, b)


def prompt_length(words: list[Word]) -> int:
    """Number of token positions used: start + words + end."""
    return 2 + sum(len(w.positions) for w in words)


def token_labels(tokenizer, prompt: str) -> list[str]:
    """A readable label per used token position: ['<start>', 'a', 'cat', …, '<end>'] (for figures)."""
    ids = tokenizer(prompt).input_ids
    labels = [tokenizer.decode([i]).strip() for i in ids]
    return ["<start>", *labels[1:-1], "<end>"]


# ---------------------------------------------------------------------------------------------------------
# Finding words
# ---------------------------------------------------------------------------------------------------------


def word_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions (in the padded sequence) of every occurrence of ``word`` in ``prompt``.

    ``word`` may be several words ("little bicycle"): consecutive prompt words must match. Raises
    ``WordNotInPromptError`` naming the prompt's words when it does not occur.
    """
    words = prompt_words(tokenizer, prompt)
    query = [word_key(w) for w in word.split()]
    if not query:
        raise WordNotInPromptError(f"empty word given for prompt {prompt!r}")
    keys = [w.key for w in words]
    found: list[int] = []
    for start in range(len(words) - len(query) + 1):
        if keys[start : start + len(query)] == query:
            span = words[start : start + len(query)]
            if len(span) == 1:
                found += list(span[0].core)
            else:  # inner punctuation belongs to the phrase; only the outer edges are trimmed
                found += [p for p in range(span[0].core[0], span[-1].core[-1] + 1)]
    if not found:
        raise WordNotInPromptError(
            f"word {word!r} is not in the prompt {prompt!r} (its words: {', '.join(keys)}); pick one of those"
        )
    return found


# ---------------------------------------------------------------------------------------------------------
# Word swap: replacement mapper (P2P §3.2)
# ---------------------------------------------------------------------------------------------------------


def _tail_pairs(n_source: int, n_target: int, max_len: int) -> list[tuple[int, int]]:
    """End token and padding of the source (from position n_source - 1) onto the target's, in order."""
    return [(i, j) for i, j in zip(range(n_source - 1, max_len), range(n_target - 1, max_len))]


def replacement_mapper(tokenizer, source: str, target: str, max_len: int | None = None) -> torch.Tensor:
    """Word-swap mapper M (max_len, max_len): M̂*[:, j] = Σ_i M[:, i]·mapper[i, j] (P2P word swap).

    Both prompts must have the same number of words. A kept word maps one-to-one; a swapped word whose
    token counts match maps one-to-one too; otherwise each target token receives the sum of the source
    word's maps divided by the target's token count (the authors' ``get_replacement_mapper``).
    """
    max_len = max_len or tokenizer.model_max_length
    ws, wt = prompt_words(tokenizer, source), prompt_words(tokenizer, target)
    if len(ws) != len(wt):
        raise AlignmentError(
            f"word swap (mode 'replace') needs prompts with the same number of words: source {source!r} has "
            f"{len(ws)}, target {target!r} has {len(wt)}. Use mode 'refine' to add words."
        )
    mapper = torch.zeros(max_len, max_len)
    mapper[0, 0] = 1.0  # start token
    for a, b in zip(ws, wt):
        if len(a.positions) == len(b.positions):
            mapper[list(a.positions), list(b.positions)] = 1.0
        else:
            for j in b.positions:
                mapper[list(a.positions), j] = 1.0 / len(b.positions)
    for i, j in _tail_pairs(prompt_length(ws), prompt_length(wt), max_len):
        mapper[i, j] = 1.0
    return mapper  # (L, L)


# ---------------------------------------------------------------------------------------------------------
# Adding a phrase: refinement alignment A(j) (P2P §3.2)
# ---------------------------------------------------------------------------------------------------------


def _lcs_pairs(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """Index pairs of one longest common subsequence of ``a`` and ``b`` (earliest matches in ``b``)."""
    n, m = len(a), len(b)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            table[i][j] = table[i + 1][j + 1] + 1 if a[i] == b[j] else max(table[i + 1][j], table[i][j + 1])
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        if a[i] == b[j] and table[i][j] == table[i + 1][j + 1] + 1:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def refinement_mapper(
    tokenizer, source: str, target: str, max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement alignment: mapper (max_len,) long = A(j), alphas (max_len,) = 1 where A(j) is defined.

    (M̂*)_{i,j} = (M_t)_{i,A(j)} where alphas[j] = 1, (M*_t)_{i,j} where alphas[j] = 0 (P2P, "adding a new
    phrase"). Every source word must appear in the target, in order; target words not in the source are
    the added phrase. A kept word with different edge punctuation keeps its core tokens aligned.
    """
    max_len = max_len or tokenizer.model_max_length
    ws, wt = prompt_words(tokenizer, source), prompt_words(tokenizer, target)
    pairs = _lcs_pairs([w.key for w in ws], [w.key for w in wt])
    matched = {i for i, _ in pairs}
    missing = [w.text for k, w in enumerate(ws) if k not in matched]
    if missing:
        raise AlignmentError(
            f"adding a phrase (mode 'refine') needs every source word in the target, in order; the target "
            f"{target!r} lacks {missing} of the source {source!r}. Use mode 'replace' to swap words (same word "
            "count), or keep the source words and only add new ones."
        )
    mapper = torch.zeros(max_len, dtype=torch.long)
    alphas = torch.zeros(max_len)
    mapper[0], alphas[0] = 0, 1.0  # start token
    for i, j in pairs:
        a, b = ws[i], wt[j]
        src, dst = (a.positions, b.positions) if len(a.positions) == len(b.positions) else (a.core, b.core)
        for s, d in zip(src, dst):
            mapper[d], alphas[d] = s, 1.0
    for i, j in _tail_pairs(prompt_length(ws), prompt_length(wt), max_len):
        mapper[j], alphas[j] = i, 1.0
    return mapper, alphas  # (L,), (L,)


def refinement_matrix(mapper: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The refinement alignment as a (L, L) 0/1 matrix: column j has a 1 in row A(j) where alphas[j] = 1."""
    max_len = mapper.shape[0]
    matrix = torch.zeros(max_len, max_len)
    cols = torch.nonzero(alphas > 0).flatten()
    matrix[mapper[cols], cols] = 1.0
    return matrix
