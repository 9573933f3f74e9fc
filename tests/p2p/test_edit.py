"""``p2p.edit``: editing an inversion — the reconstruction row, batched edits, clear errors, the defaults."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from nti_lightning.config import InversionConfig
from nti_lightning.edit_config import EDIT_DEFAULTS
from nti_lightning.p2p import AlignmentError, EditSpec, WordNotInPromptError, edit, edit_batch
from nti_lightning.p2p.edit import default_guidance_scale
from nti_lightning.store.inversion import IncompatibleInversionError

from .helpers import SOURCE, make_inversion


def test_same_prompt_edit_is_the_reconstruction(model, inv):
    from nti_lightning.api import reconstruction_latents

    result = edit(model, inv, inv.prompt)
    assert result.modes == [None]
    assert torch.equal(result.latents[1], result.latents[0])
    assert torch.equal(result.latents[0], reconstruction_latents(model, [inv, inv])[0])  # same batch size: exact
    assert result.images[1].tobytes() == result.images[0].tobytes()


def test_batched_edits_of_one_image(model, inv):
    specs = [
        EditSpec("a dog sitting next to a mirror"),
        EditSpec("a cat sitting next to a silver mirror"),
        EditSpec(SOURCE, reweight={"mirror": 2.0}),
        EditSpec(SOURCE),
    ]
    result = edit_batch(model, inv, specs, return_attention=True)
    assert result.modes == ["replace", "refine", "reweight", None]
    assert result.latents.shape == (5, 4, 8, 8) and len(result.images) == 5
    assert torch.isfinite(result.latents).all()
    assert result.attention.shape == (5, 2, 2, 77)  # 8×8 latents → 2×2 maps
    unscaled = result.attention[[0, 1, 4]]  # refine and reweight rows need not sum to 1
    torch.testing.assert_close(unscaled.sum(-1), torch.ones(3, 2, 2))  # averaged softmax rows
    assert result.token_labels[1][:3] == ["<start>", "a", "dog"]
    figure = result.attention_image(1)
    assert figure.width >= len(result.token_labels[1]) * 128 and figure.height > 2 * 128


def test_errors_are_clear(model, inv):
    with pytest.raises(WordNotInPromptError, match="'horse'"):
        edit(model, inv, "a dog sitting next to a mirror", blend_words=["horse"])
    with pytest.raises(WordNotInPromptError, match="'horse' is not in the prompt"):
        edit(model, inv, inv.prompt, reweight={"horse": 2.0})
    with pytest.raises(AlignmentError, match="same number of words"):
        edit(model, inv, "a dog sitting next to a big mirror", mode="replace")
    with pytest.raises(AlignmentError, match="lacks"):
        edit(model, inv, "a dog next to a mirror", mode="refine")
    with pytest.raises(AlignmentError, match="differs from the source"):
        edit(model, inv, "a dog sitting next to a mirror", mode="reweight", reweight={"dog": 2.0})
    other = make_inversion(model)
    other.meta["model_fingerprint"] = "0123456789abcdef"
    with pytest.raises(IncompatibleInversionError, match="fingerprint"):
        edit(model, other, "a dog sitting next to a mirror")


def test_defaults_are_edit_config_s():
    """EditSpec and edit() take the step windows and the blend settings from EditConfig, not literals."""
    spec = EditSpec("a dog")
    assert (spec.mode, spec.cross_replace_steps, spec.self_replace_steps) == (
        EDIT_DEFAULTS.mode,
        EDIT_DEFAULTS.cross_replace,
        EDIT_DEFAULTS.self_replace,
    )
    params = inspect.signature(edit).parameters
    assert params["cross_replace_steps"].default == EDIT_DEFAULTS.cross_replace
    assert params["self_replace_steps"].default == EDIT_DEFAULTS.self_replace
    batch = inspect.signature(edit_batch).parameters
    assert batch["local_blend_start"].default == EDIT_DEFAULTS.local_blend_start
    assert batch["local_blend_threshold"].default == EDIT_DEFAULTS.local_blend_threshold
    assert dataclasses.asdict(EDIT_DEFAULTS)["cross_replace"] == 0.8 and EDIT_DEFAULTS.self_replace == 0.4  # authors


def test_guidance_scale_is_the_inversion_s_unless_given(model, inv):
    assert edit(model, inv, inv.prompt).guidance_scale == default_guidance_scale(inv) == 7.5
    other = make_inversion(model)
    other.meta["hyperparameters"] = {"guidance_scale": 3.0}
    assert edit(model, other, other.prompt).guidance_scale == 3.0
    other.meta["hyperparameters"] = {}  # an inversion that records none: InversionConfig's default
    assert default_guidance_scale(other) == InversionConfig.guidance_scale
    given = edit(model, other, other.prompt, guidance_scale=5.0)
    assert given.guidance_scale == 5.0
    assert not torch.equal(
        given.latents, edit(model, other, other.prompt, guidance_scale=3.0).latents
    )  # w is used, not only recorded
    with pytest.raises(ValueError, match="unknown edit mode 'swap'"):
        edit(model, inv, SOURCE, mode="swap")
