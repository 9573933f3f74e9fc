"""The edit rules of Prompt-to-Prompt (Hertz et al. 2022, §3.2): one ``TargetEdit`` per target prompt.

A ``TargetEdit`` says how one target row's attention is rewritten from the source row's — which source token
feeds which target token (the word-swap / refinement mapper), which tokens keep their own maps, the
re-weighting factors c, and the steps in which cross- and self-attention are injected (τ of Algorithm 1). The
controller (``controllers.AttentionControlEdit``) applies them; this file only builds them from prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nti_lightning.edit_config import EDIT_DEFAULTS, CrossReplace, StepWindow, window_fractions
from nti_lightning.p2p import alignment


@dataclass
class TargetEdit:
    """How one target prompt's attention is rewritten from the source's (one row of the batch)."""

    mapper: torch.Tensor  # (L, L): source token i → target token j weights (identity: same prompt)
    alphas: torch.Tensor  # (L,): 1 where target token j takes the mapped source map, 0 where it keeps its own
    equalizer: torch.Tensor  # (L,): re-weighting factor c per target token (1: unchanged)
    cross_replace: torch.Tensor  # (T, L): 1 where step i injects the source map into token j
    self_replace: tuple[int, int]  # steps start ≤ i < end inject the source's self-attention


def step_range(window: StepWindow, num_steps: int) -> tuple[int, int]:
    """(start, end) step indices of a window: steps start ≤ i < end (P2P's τ as a fraction of T)."""
    start, end = window_fractions(window)
    return int(start * num_steps + 1e-9), int(end * num_steps + 1e-9)


def cross_replace_schedule(tokenizer, target: str, num_steps: int, cross_replace_steps: CrossReplace) -> torch.Tensor:
    """(T, L) 0/1: step i injects the source map into target token j.

    ``cross_replace_steps`` is a window for all tokens, or a dict of windows: ``"default_"`` (all tokens;
    the whole run if absent, as the authors) and words of the target prompt with their own window.
    """
    max_len = tokenizer.model_max_length
    if not isinstance(cross_replace_steps, dict):
        cross_replace_steps = {"default_": cross_replace_steps}
    schedule = torch.zeros(num_steps, max_len)
    start, end = step_range(cross_replace_steps.get("default_", (0.0, 1.0)), num_steps)
    schedule[start:end] = 1.0
    for word, window in cross_replace_steps.items():
        if word == "default_":
            continue
        positions = alignment.word_token_indices(tokenizer, target, word)
        start, end = step_range(window, num_steps)
        schedule[:, positions] = 0.0
        schedule[start:end, positions] = 1.0
    return schedule


def reweight_equalizer(tokenizer, target: str, weights: dict[str, float] | None) -> torch.Tensor:
    """(L,) factors c for the target's tokens: each word's tokens get its scale, all others 1."""
    equalizer = torch.ones(tokenizer.model_max_length)
    for word, scale in (weights or {}).items():
        equalizer[alignment.word_token_indices(tokenizer, target, word)] = float(scale)
    return equalizer


def target_edit(
    tokenizer,
    source: str,
    target: str,
    mode: str,
    num_steps: int,
    cross_replace_steps: CrossReplace = EDIT_DEFAULTS.cross_replace,
    self_replace_steps: StepWindow = EDIT_DEFAULTS.self_replace,
    reweight: dict[str, float] | None = None,
) -> TargetEdit:
    """The rule for one target. mode: "replace" (word swap), "refine" (adding a phrase) or "reweight"
    (the target must then equal the source); ``reweight`` may accompany any mode (the authors' chained
    ``AttentionReweight(prev_controller=...)``)."""
    max_len = tokenizer.model_max_length
    if mode == "replace":
        mapper, alphas = alignment.replacement_mapper(tokenizer, source, target), torch.ones(max_len)
    elif mode == "refine":
        index, alphas = alignment.refinement_mapper(tokenizer, source, target)
        mapper = alignment.refinement_matrix(index, alphas)
    elif mode == "reweight":
        if not alignment.same_prompt(tokenizer, source, target):
            raise alignment.AlignmentError(
                f"mode 'reweight' re-weights the source prompt's own words; the target {target!r} differs from "
                f"the source {source!r}. Use mode 'replace' or 'refine' with reweight= to change words too."
            )
        if not reweight:
            raise ValueError("mode 'reweight' needs at least one WORD=SCALE")
        mapper, alphas = torch.eye(max_len), torch.ones(max_len)
    else:
        raise ValueError(f"unknown edit mode {mode!r}; choose replace, refine or reweight")
    return TargetEdit(
        mapper=mapper,
        alphas=alphas,
        equalizer=reweight_equalizer(tokenizer, target, reweight),
        cross_replace=cross_replace_schedule(tokenizer, target, num_steps, cross_replace_steps),
        self_replace=step_range(self_replace_steps, num_steps),
    )


def identity_edit(max_len: int, num_steps: int) -> TargetEdit:
    """A target that keeps its own attention everywhere."""
    return TargetEdit(
        torch.eye(max_len), torch.ones(max_len), torch.ones(max_len), torch.zeros(num_steps, max_len), (0, 0)
    )


def blend_word_weights(tokenizer, source: str, target: str, words: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """(L,) source and target 0/1 token weights for local-blend words; each word is looked up in both
    prompts and must occur in at least one."""
    max_len = tokenizer.model_max_length
    src, tgt = torch.zeros(max_len), torch.zeros(max_len)
    for word in words:
        hits = 0
        for prompt, weights in ((source, src), (target, tgt)):
            try:
                weights[alignment.word_token_indices(tokenizer, prompt, word)] = 1.0
                hits += 1
            except alignment.WordNotInPromptError:
                pass
        if not hits:
            raise alignment.WordNotInPromptError(
                f"blend word {word!r} is in neither the source prompt {source!r} nor the target {target!r}"
            )
    return src, tgt
