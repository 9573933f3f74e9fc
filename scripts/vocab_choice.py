"""The numbers behind the tiny models' vocabulary (docs/tiny_model.md, "Vocabulary"): what moving them to CLIP's
49,408-token vocabulary would cost in text-encoder size and what it would bring to the words they are trained on.

    python scripts/vocab_choice.py

Prints, for the training captions of ``train_tiny.py`` (captions of the photos, of the procedural scenes and
of the held-out demo samples): how many distinct tokens they use in each vocabulary (the only embeddings
training can move), their tokens per caption, and the size of the token-embedding table of each embedded text
encoder under each vocabulary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from nti_lightning.models import clip_vocab, tiny  # noqa: E402
from nti_lightning.models.embedded import ASSETS_DIR  # noqa: E402


def training_captions() -> list[str]:
    import train_tiny

    return (
        [c for cs in train_tiny.CAPTIONS.values() for c in cs]
        + train_tiny.SCENE_CAPTIONS
        + [c for *_, c in train_tiny.DEMO_SAMPLES]
    )


def usage(tokenizer, captions: list[str]) -> tuple[int, float]:
    """(distinct tokens the captions use, tokens per caption)."""
    seen, total = set(), 0
    for caption in captions:
        ids = tokenizer(caption, add_special_tokens=False).input_ids
        seen |= set(ids)
        total += len(ids)
    return len(seen), total / len(captions)


def main() -> None:
    captions = training_captions()
    vocabularies = {"tiny": tiny.build_tokenizer(), "CLIP": clip_vocab.clip_tokenizer()}
    words = {w for c in captions for w in c.lower().split()}
    print(f"{len(captions)} training captions, {len(words)} distinct words")
    for name, tok in vocabularies.items():
        used, per = usage(tok, captions)
        print(f"{name:5s} vocabulary {len(tok):6d} tokens: the captions use {used} ({100 * used / len(tok):.2f}%), "
              f"{per:.1f} tokens a caption")  # fmt: skip
    for folder in ("tiny/text_encoder", "tiny_sd2/text_encoder", "tiny_sdxl/text_encoder_2"):
        config = json.loads((ASSETS_DIR / folder / "config.json").read_text(encoding="utf-8"))
        width = config["hidden_size"]
        stored = sum(f.stat().st_size for f in (ASSETS_DIR / folder).iterdir()) / 2**20
        extra = (clip_vocab.VOCAB_SIZE - config["vocab_size"]) * width * 4 / 2**20
        print(f"{folder}: width {width}, stored {stored:.2f} MiB; a {clip_vocab.VOCAB_SIZE}-token embedding adds "
              f"{extra:.2f} MiB in fp32 ({extra / 2:.2f} in fp16)")  # fmt: skip


if __name__ == "__main__":
    main()
