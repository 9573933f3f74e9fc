"""Prompt-to-Prompt editing on a tiny random-weight model (CPU): attention plumbing, controllers, alignment,
editing an inversion, the CLI. Random weights make no sense of images, so every test checks an equality."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from nti_lightning.ddim import schedule_from_scheduler
from nti_lightning.inversion import IncompatibleInversionError, Inversion, save_inversion
from nti_lightning.models import model_from_components
from nti_lightning.models.tiny import build_random_components
from nti_lightning.p2p import (
    AlignmentError,
    AttentionReweight,
    EditSpec,
    EmptyControl,
    WordNotInPromptError,
    attention_control,
    edit,
    edit_batch,
)
from nti_lightning.p2p import alignment as al
from nti_lightning.p2p.attention import place_in_unet
from nti_lightning.p2p.controllers import (
    cross_replace_schedule,
    map_shape,
    pick_attention_queries,
    step_range,
)
from nti_lightning.p2p.edit import build_controller
from nti_lightning.sampling import ddim_sample, unet_denoiser
from nti_lightning.text import encode_null, encode_text

T = 4  # DDIM steps
SOURCE = "a cat sitting next to a mirror"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads only add overhead (and noise on a shared machine)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return model_from_components(**build_random_components(0))


@pytest.fixture(scope="module")
def tok(model):
    return model.tokenizer


def make_inversion(model, prompt: str = SOURCE, side: int = 8, seed: int = 0) -> Inversion:
    """An inversion-shaped record: random z_T, per-step null embeddings near ψ(""), the model's identity."""
    g = torch.Generator().manual_seed(seed)
    schedule = schedule_from_scheduler(model.scheduler, T)
    null = encode_null(model, 1)[0]  # (L, D)
    return Inversion(
        z_T=torch.randn(4, side, side, generator=g),
        null_embeddings=null[None].repeat(T, 1, 1) + 0.01 * torch.randn(T, *null.shape, generator=g),
        timesteps=schedule.timesteps,
        prompt=prompt,
        pivot_z0=torch.randn(4, side, side, generator=g),
        pivot_zT=torch.zeros(4, side, side),
        inner_steps=torch.zeros(T, dtype=torch.long),
        final_loss=torch.zeros(T),
        meta={
            "model_source": model.source,
            "model_fingerprint": model.fingerprint,
            "hyperparameters": {"guidance_scale": 7.5},
            "image_size": side * model.vae_scale_factor,
        },
    )


@pytest.fixture(scope="module")
def inv(model):
    return make_inversion(model)


def n_tokens(tok, word: str) -> int:
    return len(tok(word, add_special_tokens=False).input_ids)


class Recorder:
    """Wraps a controller; keeps (is_cross, place, maps in, maps out) of every attention call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, attn, is_cross, place):
        out = self.inner(attn, is_cross, place)
        self.calls.append((is_cross, place, attn.clone(), out.clone()))
        return out

    def step_callback(self, step, z):
        return self.inner.step_callback(step, z)


def sample_with(model, inv, prompts, controller, w=7.5):
    """The edit's sampling loop with an explicit controller (as ``edit_batch`` step 3)."""
    schedule = schedule_from_scheduler(model.scheduler, T)
    B = len(prompts)
    z_T = inv.z_T[None].expand(B, -1, -1, -1)
    nulls = [{"prompt_embeds": inv.null_embeddings[i][None].expand(B, -1, -1)} for i in range(T)]
    cond = {"prompt_embeds": encode_text(model, prompts)}
    with attention_control(model.unet, controller):
        return ddim_sample(
            unet_denoiser(model.unet, model.family), schedule, z_T, cond, nulls, w, controller.step_callback
        )


def unet_inputs(B=2, side=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, side, side, generator=g), torch.tensor(981), torch.randn(B, 77, 32, generator=g)


# ---------------------------------------------------------------------------------------------------------
# Attention processor
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_identity_controller_equals_stock_processor(model):
    unet = model.unet
    z, t, c = unet_inputs()
    original = dict(unet.attn_processors)
    unet.set_attn_processor(AttnProcessor())
    try:
        stock = unet(z, t, encoder_hidden_states=c).sample
        with attention_control(unet, EmptyControl()):
            assert all(type(p).__name__ == "P2PAttnProcessor" for p in unet.attn_processors.values())
            controlled = unet(z, t, encoder_hidden_states=c).sample
        assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())  # restored
    finally:
        unet.set_attn_processor(dict(original))
    assert torch.equal(controlled, stock)
    assert {k: id(v) for k, v in unet.attn_processors.items()} == {k: id(v) for k, v in original.items()}


@torch.no_grad()
def test_processor_hands_every_map_with_its_place(model):
    unet = model.unet
    z, t, c = unet_inputs()
    rec = Recorder(EmptyControl())
    with attention_control(unet, rec):
        unet(z, t, encoder_hidden_states=c)
    names = list(unet.attn_processors)
    assert len(rec.calls) == len(names)
    expected = sorted((".attn2." in n, place_in_unet(n)) for n in names)
    assert sorted((is_cross, place) for is_cross, place, _, _ in rec.calls) == expected
    heads = unet.config.attention_head_dim  # diffusers reads it as the number of heads
    for is_cross, _, attn, _ in rec.calls:
        assert attn.shape[0] == 2 * heads
        assert attn.shape[2] == (77 if is_cross else attn.shape[1])
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:2]))  # softmax rows


def test_processors_restored_after_error(model):
    before = {k: id(v) for k, v in model.unet.attn_processors.items()}
    with pytest.raises(RuntimeError):
        with attention_control(model.unet, EmptyControl()):
            raise RuntimeError("boom")
    assert {k: id(v) for k, v in model.unet.attn_processors.items()} == before


# ---------------------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Controllers
# ---------------------------------------------------------------------------------------------------------


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


def test_reweight_scales_exactly_the_chosen_columns(tok):
    ctrl = AttentionReweight(tok, [SOURCE, SOURCE], T, cross_replace_steps=1.0, reweight={"cat": 3.0, "mirror": 0.5})
    heads, q = 4, 16
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(2 * 2 * heads, q, 77, generator=g).softmax(-1)  # [∅ src, ∅ tgt, C src, C tgt]
    out = ctrl(attn, True, "down")
    assert torch.equal(out[: 2 * heads], attn[: 2 * heads])  # ∅ half untouched
    assert torch.equal(out[2 * heads : 3 * heads], attn[2 * heads : 3 * heads])  # source row untouched
    base, tgt = attn[2 * heads : 3 * heads], out[3 * heads :]
    cat, mirror = al.word_token_indices(tok, SOURCE, "cat"), al.word_token_indices(tok, SOURCE, "mirror")
    others = [j for j in range(77) if j not in cat + mirror]
    assert torch.equal(tgt[..., cat], base[..., cat] * 3.0)
    assert torch.equal(tgt[..., mirror], base[..., mirror] * 0.5)
    assert torch.equal(tgt[..., others], base[..., others])


def test_attention_geometry_from_the_latent():
    assert map_shape(16, (16, 16)) == (4, 4) and map_shape(8, (8, 16)) == (2, 4)
    assert pick_attention_queries([256, 64, 16, 4], (16, 16)) == 16  # tiny 128 px: 4×4 (= SD's 16 of 64)
    assert pick_attention_queries([4096, 1024, 256, 64], (64, 64)) == 256  # SD 512 px: 16×16
    assert pick_attention_queries([256, 64], (16, 16)) == 64  # closest existing
    assert pick_attention_queries([256, 64, 16], (16, 16), side=8) == 64
    with pytest.raises(ValueError, match="side 3"):
        pick_attention_queries([256, 64], (16, 16), side=3)


# ---------------------------------------------------------------------------------------------------------
# Editing an inversion
# ---------------------------------------------------------------------------------------------------------


def test_same_prompt_edit_is_the_reconstruction(model, inv):
    from nti_lightning.api import reconstruction_latents

    result = edit(model, inv, inv.prompt)
    assert result.modes == [None]
    assert torch.equal(result.latents[1], result.latents[0])
    assert torch.equal(result.latents[0], reconstruction_latents(model, [inv, inv])[0])  # same batch size: exact
    assert result.images[1].tobytes() == result.images[0].tobytes()


@torch.no_grad()
def test_replace_over_all_steps_injects_the_source_maps(model, inv, tok):
    target = "a dog sitting next to a mirror"
    controller, modes = build_controller(tok, SOURCE, [EditSpec(target, "replace", 1.0, 1.0)], T, (8, 8))
    assert modes == ["replace"]
    rec = Recorder(controller)
    sample_with(model, inv, [SOURCE, target], rec)
    heads = model.unet.config.attention_head_dim
    assert len(rec.calls) == T * len(model.unet.attn_processors)
    quarter = 8 * 8 // 4
    n_self_checked = 0
    for is_cross, _, attn_in, out in rec.calls:
        src_out, tgt_out = out[2 * heads : 3 * heads], out[3 * heads :]
        assert torch.equal(out[: 2 * heads], attn_in[: 2 * heads])  # ∅ half untouched
        assert torch.equal(src_out, attn_in[2 * heads : 3 * heads])  # the source is never edited
        if is_cross or attn_in.shape[1] <= quarter:
            assert torch.equal(tgt_out, src_out)  # injected: the target uses the source's maps
            n_self_checked += not is_cross
        else:
            assert torch.equal(tgt_out, attn_in[3 * heads :])  # finest self-attention keeps its own
    assert n_self_checked > 0


def test_reweight_edit_in_the_unet(model, inv, tok):
    controller, modes = build_controller(
        tok, SOURCE, [EditSpec(SOURCE, None, 1.0, 0.0, reweight={"cat": 2.0})], T, (8, 8)
    )
    assert modes == ["reweight"]
    rec = Recorder(controller)
    with torch.no_grad():
        sample_with(model, inv, [SOURCE, SOURCE], rec)
    heads = model.unet.config.attention_head_dim
    cat = al.word_token_indices(tok, SOURCE, "cat")
    eq = torch.ones(77)
    eq[cat] = 2.0
    crosses = [(a, o) for is_cross, _, a, o in rec.calls if is_cross]
    assert crosses
    for attn_in, out in crosses:
        assert torch.equal(out[3 * heads :], attn_in[2 * heads : 3 * heads] * eq)


def test_local_blend_keeps_the_source_outside_the_mask(model, inv):
    result = edit(
        model,
        inv,
        "a dog sitting next to a mirror",
        blend_words=["cat", "dog"],
        local_blend_threshold=0.99,  # random maps are nearly flat: keep only the peak so the mask is partial
        local_blend_start=0.0,
    )
    mask = result.blend_mask[0, 0]  # (h, w)
    assert mask.shape == (8, 8) and mask.any() and not mask.all()
    outside = ~mask
    assert torch.equal(result.latents[1][:, outside], result.latents[0][:, outside])
    assert not torch.equal(result.latents[1][:, mask], result.latents[0][:, mask])


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


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def parse(argv):
    import argparse

    from nti_lightning.p2p.cli import add_edit_subparser

    parser = argparse.ArgumentParser(prog="nti")
    add_edit_subparser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_single_and_batch(model, tmp_path, monkeypatch):
    from PIL import Image

    from nti_lightning.p2p import cli

    monkeypatch.setattr(cli, "load_model_for", lambda inv, spec, device: model)
    for image_id, prompt, seed in (("cat", SOURCE, 0), ("car", "a red car on a road", 1)):
        save_inversion(tmp_path / image_id / "inversion.safetensors", make_inversion(model, prompt, seed=seed))

    args = parse(["edit", str(tmp_path / "cat" / "inversion.safetensors"), "--target", "a dog sitting next to a mirror",
                  "--blend", "cat", "dog", "--cross-replace", "0.6", "dog=0.3", "--attention"])  # fmt: skip
    assert cli.run_edit(args) == 0
    edits = tmp_path / "cat" / "edits"
    strip = Image.open(edits / "a_dog_sitting_next_to_a_mirror_strip.png")
    assert strip.size == (3 * 64 + 2 * 4, 64)  # input | reconstruction | edit
    assert (edits / "a_dog_sitting_next_to_a_mirror_attention.png").is_file()

    lines = [
        {"image_id": "cat", "target": "a dog sitting next to a mirror", "blend": ["cat", "dog"]},
        {"image_id": "cat", "target": "a cat sitting next to a silver mirror", "mode": "refine"},
        {"image_id": "cat", "target": SOURCE, "reweight": {"cat": 2}},
        {"image_id": "cat", "target": "a dog sitting next to a mirror", "blend": ["horse"]},  # word not there
        {"image_id": "car", "target": "a blue car on a road", "cross_replace": {"default": 0.8, "blue": 0.2}},
        {"image_id": "car", "target": "a car", "mode": "replace"},  # cannot be aligned
        {"image_id": "nope", "target": "a dog"},  # no such image
        {"image_id": "car", "target": "a blue car", "colour": 1},  # unknown field
    ]
    edits_file = tmp_path / "edits.jsonl"
    edits_file.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    assert cli.run_edit(parse(["edit", str(tmp_path), "--edits", str(edits_file), "--batch-size", "2"])) == 0
    results = [json.loads(x) for x in (tmp_path / "edit_results.jsonl").read_text().splitlines()]
    status = {r["line"]: r["status"] for r in results}
    assert status == {
        1: "ok",
        2: "ok",
        3: "ok",
        4: "failed",
        5: "ok",
        6: "failed",
        7: "failed",
        8: "failed",
        9: "failed",
    }
    by_line = {r["line"]: r for r in results}
    assert by_line[2]["mode"] == "refine" and by_line[3]["mode"] == "reweight"
    assert "horse" in by_line[4]["error"] and "same number of words" in by_line[6]["error"]
    assert "unknown field" in by_line[8]["error"] and "JSON" in by_line[9]["error"]
    for line in (1, 2, 3, 5):
        assert (tmp_path / by_line[line]["paths"]["strip"]).is_file()
