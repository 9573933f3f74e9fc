"""``p2p.rules``: step windows, per-word cross-replace schedules, the per-target rules."""

from __future__ import annotations

import pytest
import torch

from nti_lightning.p2p import AlignmentError, WordNotInPromptError
from nti_lightning.p2p import alignment as al
from nti_lightning.p2p.rules import cross_replace_schedule, identity_edit, step_range, target_edit

from .helpers import DOG, SOURCE


def test_step_windows_and_per_word_cross_replace(tok):
    assert step_range(0.8, 50) == (0, 40) and step_range((0.2, 0.6), 10) == (2, 6) and step_range(1.0, 4) == (0, 4)
    with pytest.raises(ValueError):
        step_range(1.5, 4)
    target = "a dog sitting next to a mirror"
    sched = cross_replace_schedule(tok, target, 10, {"default_": 0.8, "dog": 0.3})
    assert sched[:, 1].tolist() == [1.0] * 8 + [0.0] * 2
    assert sched[:, 2].tolist() == [1.0] * 3 + [0.0] * 7
    with pytest.raises(WordNotInPromptError):
        cross_replace_schedule(tok, target, 10, {"cat": 0.3})


@pytest.mark.parametrize("window", [1.5, -0.1, (0.6, 0.2), (0.1, 0.2, 0.3), True, "half"])
def test_step_window_rejects_what_is_not_a_window(window):
    with pytest.raises(ValueError, match="step window"):
        step_range(window, 10)


def test_target_edit_per_mode(tok):
    replace = target_edit(tok, SOURCE, DOG, "replace", 10, 0.5, (0.2, 0.4), reweight={"dog": 2.0})
    assert torch.equal(replace.mapper, al.replacement_mapper(tok, SOURCE, DOG))
    assert torch.equal(replace.alphas, torch.ones(77))
    dog = al.word_token_indices(tok, DOG, "dog")
    assert replace.equalizer[dog].eq(2.0).all() and replace.equalizer.sum() == 77 + len(dog)
    assert torch.equal(replace.cross_replace, torch.cat([torch.ones(5, 77), torch.zeros(5, 77)]))
    assert replace.self_replace == (2, 4)
    with pytest.raises(AlignmentError, match="differs from the source"):
        target_edit(tok, SOURCE, DOG, "reweight", 10, reweight={"dog": 2.0})
    with pytest.raises(ValueError, match="needs at least one"):
        target_edit(tok, SOURCE, SOURCE, "reweight", 10)
    with pytest.raises(ValueError, match="unknown edit mode 'swap'"):
        target_edit(tok, SOURCE, DOG, "swap", 10)
    with pytest.raises(WordNotInPromptError, match="'horse'"):
        target_edit(tok, SOURCE, DOG, "replace", 10, reweight={"horse": 2.0})
    keep = identity_edit(77, 10)
    assert torch.equal(keep.cross_replace, torch.zeros(10, 77)) and keep.self_replace == (0, 0)
