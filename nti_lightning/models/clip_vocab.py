"""The tokenizer real Stable Diffusion prompts go through, built offline from CLIP's BPE merges file.

SD1.x's tokenizer (OpenAI CLIP ViT-L/14), SD2.x's and both of SDXL's share one byte-level BPE vocabulary
(Radford et al. 2021, CLIP; ``bpe_simple_vocab_16e6.txt.gz``): the 256 byte symbols, the same 256 ending a
word (``</w>``), one token per merge (48,894), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407)
= 49,408 tokens. They differ only in the pad token: ``<|endoftext|>`` for SD1.x and SDXL's first tokenizer,
OpenCLIP's ``"!"`` (id 0) for SD2.x and SDXL's ``tokenizer_2``.

The merges file is read from an installed ``open_clip_torch`` (located, not imported: its ``__init__`` needs
torchvision) or else from the copy shipped in ``assets/clip/`` (MIT, licence beside it); ``clip_tokenizer``
turns it into a ``transformers.CLIPTokenizer`` the way CLIP's own ``SimpleTokenizer`` reads it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from nti_lightning.models.embedded import ASSETS_DIR

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VENDORED_BPE = ASSETS_DIR / "clip" / BPE_FILE
"""The copy shipped with the package (taken from the open_clip_torch 3.3.0 wheel)."""
NUM_MERGES = 49152 - 256 - 2
"""Merges CLIP reads from the file: the lines after its header up to a 49,152-symbol vocabulary, less the
256 byte symbols and 2 special tokens (``SimpleTokenizer``: ``merges[1 : 49152 - 256 - 2 + 1]``)."""
BOS_TOKEN, EOS_TOKEN, OPEN_CLIP_PAD = "<|startoftext|>", "<|endoftext|>", "!"
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49,408
BOS_TOKEN_ID, EOS_TOKEN_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1  # 49406, 49407
CONTEXT_LENGTH = 77


def bpe_path() -> Path:
    """CLIP's merges file: an installed open_clip_torch's if there is one, else the package's copy."""
    spec = importlib.util.find_spec("open_clip")  # finds the package without running its __init__
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / BPE_FILE).is_file():
                return Path(folder) / BPE_FILE
    return VENDORED_BPE


def byte_table() -> dict[int, str]:
    """Byte → the printable stand-in CLIP's BPE works on, in CLIP's id order (GPT-2's reversible byte-level map,
    Radford et al. 2019): the printable Latin-1 bytes stand for themselves and come first; the other 68 bytes
    take the code points from 256 on, in byte order.

    Written here because the ids follow this order: ``tokenizers``' ``ByteLevel.alphabet()`` has the same 256
    symbols but unordered (pinned in tests/models/test_real_tokenizer.py).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


def byte_symbols() -> list[str]:
    """The 256 byte symbols in id order: ids 0–255 of CLIP's vocabulary (256–511 are the same + ``</w>``)."""
    return list(byte_table().values())


@lru_cache(maxsize=4)
def clip_vocab_and_merges(path: str | None = None) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary (token → id, 49,408 entries) and merges, read from the merges file at ``path``
    (default ``bpe_path()``): bytes, bytes + ``</w>``, one token per merge in file order, the two specials."""
    lines = gzip.decompress(Path(path or bpe_path()).read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])  # line 0 is the "#version" header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path or bpe_path()} is not CLIP's merges file ({len(merges)} merges read)")
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(folder: str | Path, pad_token: str = EOS_TOKEN) -> Path:
    """Writes ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of CLIP's tokenizer into ``folder``
    (the layout of a diffusers model's ``tokenizer/``) → the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "model_max_length": CONTEXT_LENGTH,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def clip_tokenizer(pad_token: str = EOS_TOKEN):
    """SD's ``CLIPTokenizer`` (49,408 tokens, 77 positions) padding with ``pad_token``: ``EOS_TOKEN`` for SD1.x
    and SDXL's ``tokenizer``, ``OPEN_CLIP_PAD`` ("!") for SD2.x and SDXL's ``tokenizer_2``.

    Loaded through ``from_pretrained`` on the files ``write_tokenizer_files`` writes: the constructor takes
    file paths in transformers 4 and a dict and list in 5, while a folder loads the same way in both."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="nti-clip-") as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp, pad_token))
    if len(tokenizer) != VOCAB_SIZE or tokenizer.bos_token_id != BOS_TOKEN_ID or tokenizer.eos_token_id != EOS_TOKEN_ID:
        raise ValueError(
            f"CLIP tokenizer built with {len(tokenizer)} tokens, BOS {tokenizer.bos_token_id}, EOS "
            f"{tokenizer.eos_token_id}; expected {VOCAB_SIZE}, {BOS_TOKEN_ID}, {EOS_TOKEN_ID}"
        )
    return tokenizer
