"""Prompt checks and Prompt-to-Prompt on the tokenizer real SD1.x / SD2.x / SDXL prompts go through: CLIP's BPE
(``models/clip_vocab.py``), checked against the published facts and, where open_clip_torch is installed (CI
installs it), against OpenCLIP's own ``SimpleTokenizer``. The tiny models keep their small vocabulary
(docs/tiny_model.md, "Vocabulary"); these tests need no text encoder except the last one."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

from nti_lightning.models import clip_vocab
from nti_lightning.p2p import EditSpec, WordNotInPromptError
from nti_lightning.p2p import alignment as al
from nti_lightning.p2p.edit import resolve_mode
from nti_lightning.p2p.rules import blend_word_weights, target_edit
from nti_lightning.text import PromptError, _token_ids, check_prompt

VENDORED_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
"""sha256 of ``bpe_simple_vocab_16e6.txt.gz`` as the open_clip_torch 3.3.0 wheel ships it."""
PROMPTS = [
    "a photo of a cat",
    "A frowning kangaroo in a Parisian café.",
    "Two kangaroos, frowning; a quokka & a xylophonist!",
    "an astronaut riding a horse on the moon, 4k, photorealistic",
    "don't look: it's the cat's (new) hat",
    "Neuschwanstein castle at dusk -- oil painting",
]


@pytest.fixture(scope="module")
def tok():
    return clip_vocab.clip_tokenizer()


@pytest.fixture(scope="module")
def tok2():
    """SDXL's ``tokenizer_2`` (and SD2.x's tokenizer): the same vocabulary, padding with "!"."""
    return clip_vocab.clip_tokenizer(pad_token=clip_vocab.OPEN_CLIP_PAD)


def ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False).input_ids)


# ---------------------------------------------------------------------------------------------------------
# The vocabulary: published facts, the files, OpenCLIP's own tokenizer
# ---------------------------------------------------------------------------------------------------------


def test_published_facts(tok, tok2):
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == (
        "<|startoftext|>", 49406, "<|endoftext|>", 49407
    )  # fmt: skip
    assert tok.pad_token_id == 49407  # SD1.x and SDXL's first tokenizer pad with <|endoftext|>
    assert (tok2.pad_token, tok2.pad_token_id) == ("!", 0)  # SD2.x and SDXL's tokenizer_2 pad with "!"
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.convert_ids_to_tokens([0, 255, 256, 511, 512, 49405]) == ["!", "Ń", "!</w>", "Ń</w>", "in", "jekyll</w>"]


def test_byte_symbols_are_written_here_because_the_library_alphabet_is_unordered():
    from tokenizers.pre_tokenizers import ByteLevel

    ours = clip_vocab.byte_symbols()
    assert len(ours) == 256 and sorted(ByteLevel.alphabet()) == sorted(ours)
    assert ByteLevel.alphabet() != ours  # the ids follow CLIP's order, which the library's list does not give


def test_vendored_merges_file_is_the_wheels():
    assert hashlib.sha256(clip_vocab.VENDORED_BPE.read_bytes()).hexdigest() == VENDORED_SHA256
    assert (clip_vocab.VENDORED_BPE.parent / "LICENSE").is_file()
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch is not installed (CI installs it): nothing to compare with")
    assert clip_vocab.bpe_path() != clip_vocab.VENDORED_BPE  # an installed wheel's copy is preferred
    assert clip_vocab.bpe_path().read_bytes() == clip_vocab.VENDORED_BPE.read_bytes()


def _open_clip_tokenizer():
    """OpenCLIP's ``SimpleTokenizer`` (OpenAI's, copied), loaded from its file: the package's __init__ imports
    torchvision, its tokenizer module only ftfy and regex."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or importlib.util.find_spec("ftfy") is None:
        pytest.skip("open_clip_torch and ftfy are not installed (CI installs them)")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def test_same_ids_as_open_clips_own_tokenizer(tok, tok2):
    reference = _open_clip_tokenizer()
    for prompt in PROMPTS:
        assert ids(tok, prompt) == reference.encode(prompt), prompt
        padded = reference(prompt, context_length=77)[0].tolist()  # OpenCLIP pads with 0, i.e. "!"
        if "!" not in prompt:
            assert tok2(prompt, padding="max_length", max_length=77).input_ids == padded, prompt
    # transformers matches special tokens in the text before BPE: with "!" as the pad token, a "!" of the prompt
    # becomes the pad token (0) in SD2.x's and SDXL's second tokenizer, where OpenCLIP's BPE gives "!</w>" (256)
    wow = ids(tok, "wow!")
    assert reference.encode("wow!") == wow and wow[-1] == 256
    assert ids(tok2, "wow!") == [*wow[:-1], 0]


def test_the_tiny_vocabulary_splits_words_the_real_one_keeps():
    from nti_lightning.models.tiny import build_tokenizer

    tiny = build_tokenizer()
    real = clip_vocab.clip_tokenizer()
    assert [len(ids(real, w)) for w in ("kangaroo", "Parisian", "frowning")] == [1, 1, 3]
    assert all(len(ids(tiny, w)) > 1 for w in ("kangaroo", "parisian", "frowning"))


# ---------------------------------------------------------------------------------------------------------
# Words → token positions (P2P), on real prompts
# ---------------------------------------------------------------------------------------------------------


def test_word_positions_with_capitals_punctuation_and_multi_token_words(tok):
    prompt = "A frowning Kangaroo, in a Parisian café."
    words = al.prompt_words(tok, prompt)
    assert [w.key for w in words] == ["a", "frowning", "kangaroo", "in", "a", "parisian", "café"]
    assert [len(w.positions) for w in words] == [1, 3, 2, 1, 1, 1, 2]  # "frowning" = fro·w·ning, "," and "." own
    assert al.word_token_indices(tok, prompt, "frowning") == [2, 3, 4]
    assert al.word_token_indices(tok, prompt, "kangaroo") == [5]  # the core, without ","
    assert al.word_token_indices(tok, prompt, "KANGAROO,") == [5]
    assert al.word_token_indices(tok, prompt, "café") == [10]
    assert al.word_token_indices(tok, prompt, "a") == [1, 8]  # both occurrences
    assert al.word_token_indices(tok, prompt, "frowning kangaroo") == [2, 3, 4, 5]
    assert al.prompt_length(words) == len(tok(prompt).input_ids) == 13
    assert al.token_labels(tok, prompt)[:6] == ["<start>", "a", "fro", "w", "ning", "kangaroo"]
    with pytest.raises(WordNotInPromptError, match="'kangaroos' is not in the prompt"):
        al.word_token_indices(tok, prompt, "kangaroos")


def test_real_prompts_tile_at_whitespace(tok):
    """CLIP's word split never crosses whitespace, so every real prompt's tokens are its words' tokens."""
    for prompt in PROMPTS:
        words = al.prompt_words(tok, prompt)  # raises AlignmentError where they are not
        assert [w.key for w in words][:2] == [al.word_key(w) for w in prompt.split()][:2]
        assert al.prompt_length(words) == len(tok(prompt).input_ids)


def test_word_swap_mapper_spreads_a_one_token_word_over_three(tok):
    source, target = "a smiling kangaroo in Paris", "a frowning kangaroo in Paris"
    assert len(ids(tok, "smiling")) == 1
    m = al.replacement_mapper(tok, source, target)
    assert torch.equal(m[2, 2:5], torch.full((3,), 1.0 / 3))  # "smiling" feeds fro, w, ning
    assert m[3, 5] == 1 and m[4, 6] == 1 and m[6, 8] == 1  # "kangaroo", "in", the end token shift by 2
    assert m[76, 76] == 0 and m[74, 76] == 1  # padding keeps its order


def test_refinement_aligns_around_an_inserted_multi_token_word(tok):
    source, target = "a kangaroo in a Parisian café", "a frowning kangaroo in a Parisian café at night"
    mapper, alphas = al.refinement_mapper(tok, source, target)
    assert alphas[2:5].eq(0).all()  # "frowning": three new tokens
    assert mapper[5].item() == 2 and mapper[9].item() == 6  # "kangaroo", "café" from their source positions
    assert alphas[10:12].eq(0).all()  # "at night" added at the end
    assert mapper[12].item() == 7 and alphas[12] == 1  # the end token


def test_mode_choice_and_local_blend_words_on_real_prompts(tok):
    source = "A kangaroo in a Parisian café."
    assert resolve_mode(tok, source, EditSpec("A quokka in a Parisian café.")) == "replace"
    assert resolve_mode(tok, source, EditSpec("A frowning kangaroo in a Parisian café.")) == "refine"
    same = "a KANGAROO  in a parisian café."  # the same tokens: CLIP lower-cases and collapses whitespace
    assert resolve_mode(tok, source, EditSpec(same, reweight={"café": 2})) == "reweight"
    assert resolve_mode(tok, source, EditSpec(same)) is None
    assert target_edit(tok, source, same, "reweight", 4, reweight={"café": 2}).equalizer[6] == 2
    src, tgt = blend_word_weights(tok, source, "A quokka in a Parisian café.", ["kangaroo", "quokka"])
    assert src.nonzero().flatten().tolist() == [2]  # "kangaroo" is one token in the source
    assert tgt.nonzero().flatten().tolist() == [2, 3, 4]  # qu·ok·ka in the target
    with pytest.raises(WordNotInPromptError, match="in neither"):
        blend_word_weights(tok, source, "A quokka in a Parisian café.", ["koala"])
    edit = target_edit(tok, source, "A frowning kangaroo in a Parisian café.", "refine", 4, reweight={"frowning": 3})
    assert edit.equalizer[2:5].eq(3).all() and edit.equalizer[5:].eq(1).all()


# ---------------------------------------------------------------------------------------------------------
# The 77-token limit
# ---------------------------------------------------------------------------------------------------------


def test_the_77th_token_is_accepted_and_the_78th_refused(tok, tok2):
    fits = " ".join(["a"] * 75)  # 75 words + start + end = 77
    assert len(tok(fits).input_ids) == 77 and check_prompt(tok, fits) == fits
    with pytest.raises(PromptError, match="78 tokens with start/end markers, over the tokenizer's limit of 77"):
        check_prompt(tok, fits + " a")
    long_word = " ".join(["a"] * 73) + " frowning"  # 73 + 3 + 2 = 78: a multi-token word crosses the limit
    with pytest.raises(PromptError, match="78 tokens"):
        check_prompt(tok, long_word)
    with pytest.raises(PromptError, match="78 tokens"):
        check_prompt(tok, " ".join(["a"] * 74) + " kangaroo.")  # the full stop is the 78th
    assert check_prompt(tok2, fits) == fits  # the padding token does not count


def test_sdxl_second_tokenizer_pads_with_exclamation_marks(tok, tok2):
    first = _token_ids(tok, ["a frowning kangaroo"], "cpu")[0].tolist()
    second = _token_ids(tok2, ["a frowning kangaroo"], "cpu")[0].tolist()
    assert first[:6] == second[:6] == [49406, 320, 626, 86, 762, 25513]
    assert first[6:] == [49407] * 71
    assert second[6:] == [49407] + [0] * 70  # one end token, then "!"
    assert _token_ids(tok2, [""], "cpu")[0].tolist()[:3] == [49406, 49407, 0]  # ψ("") of SD2 / SDXL's second


@pytest.fixture(scope="module")
def train_tiny():
    """scripts/train_tiny.py as a module (it imports scripts/tiny_data.py beside it)."""
    import sys

    scripts = Path(__file__).resolve().parents[2] / "scripts"
    sys.path.insert(0, str(scripts))
    spec = importlib.util.spec_from_file_location("_train_tiny", scripts / "train_tiny.py")
    module = sys.modules["_train_tiny"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(scripts))
        sys.modules.pop("_train_tiny", None)


def test_the_tiny_tokenizer_is_still_the_learners_output(tmp_path, train_tiny):
    """The tiny models keep their own small vocabulary (docs/tiny_model.md): ``train_tiny.py``'s BPE learner, on
    the byte table of ``clip_vocab``, still writes the shipped vocab.json and merges.txt byte for byte."""
    from nti_lightning.models.tiny import TINY_DIR

    train_tiny.train_tokenizer(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (TINY_DIR / "tokenizer" / name).read_bytes(), name


TOKENIZERS_TRAINER = """
import hashlib, json, sys
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
trainer = trainers.BpeTrainer(vocab_size=1280, show_progress=False, end_of_word_suffix="</w>",
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train([sys.argv[1]], trainer)
print(hashlib.sha256(json.dumps(json.loads(tok.to_str())["model"]["merges"]).encode()).hexdigest())
"""


def test_the_tokenizers_trainer_is_not_a_function_of_the_corpus(tmp_path, train_tiny):
    """Why train_tiny.py has its own BPE learner: ``tokenizers``' BpeTrainer, on the tiny models' corpus, gives
    other merges in other processes (ties between equally frequent pairs are broken in hash order)."""
    import subprocess
    import sys

    corpus = []
    for rank, word in enumerate(train_tiny.COMMON_WORDS):  # as train_tokenizer builds it
        corpus += [word] * (40 - rank // 25)
    captions = [c for cs in train_tiny.CAPTIONS.values() for c in cs] + train_tiny.SCENE_CAPTIONS
    corpus += (captions + [c for *_, c in train_tiny.DEMO_SAMPLES]) * 2
    (tmp_path / "corpus.txt").write_text("\n".join(c.lower() for c in corpus), encoding="utf-8")
    runs = [
        subprocess.run([sys.executable, "-c", TOKENIZERS_TRAINER, str(tmp_path / "corpus.txt")], capture_output=True,
                       text=True, check=True, timeout=120).stdout.strip()
        for _ in range(4)
    ]  # fmt: skip
    assert len(set(runs)) > 1, "tokenizers' BPE trainer is now deterministic: train_tiny.py could use it"
