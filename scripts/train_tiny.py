"""One trainer for every embedded tiny model: the tokenizer and VAE once, then a UNet per family on them.

The package ships a tiny Stable-Diffusion-shaped pipeline (``nti_lightning/models/tiny.py``) so that
Null-text Inversion (Mokady et al. 2023) can be run and tested offline. Random weights say nothing about the
method (a random UNet is no denoiser), so this script trains them on CPU, in minutes, on images that ship
offline (``scripts/tiny_data.py``: bundled public-domain / CC0 photographs, colour-augmented, and procedural
colour scenes; the evaluation photographs are held out):

``--family sd1`` (the default, written to ``nti_lightning/assets/tiny``):

1. Tokenizer: a byte-level BPE in CLIP's format (``vocab.json`` + ``merges.txt``), trained on the captions
   and a list of common English words, loaded with ``transformers.CLIPTokenizer``.
2. VAE: an autoencoder (L1 + MSE) on random colour crops, posterior std pinned to ~0; then the latent space
   is rescaled exactly (a scale folded into ``quant_conv`` / ``post_quant_conv``) so that
   ``scaling_factor · E(x)`` has unit standard deviation, with SD1.x's ``scaling_factor = 0.18215``.
3. UNet (SD1.x layout): ε-prediction with SD1.x's betas on those latents, 10% of captions dropped to "" so
   that classifier-free guidance has an unconditional branch to push away from.
4. Text encoder: seeded random (``build_random_components``) and frozen.

``--family sd2`` / ``--family sdxl`` reuse the vocabulary and VAE of an SD1 folder (``--base``, default the
shipped one) and train only a UNet of that family's layout (``tiny.SD2_UNET_CONFIG``: v-prediction,
linear-projection transformers, per-block head counts, on its own seeded random GELU text encoder of width 48
(``tiny.SD2_TEXT_ENCODER_CONFIG``) and a tokenizer padding with "!" like OpenCLIP's; ``tiny.SDXL_UNET_CONFIG``:
two text encoders, ``addition_embed_type="text_time"`` with pooled text and ``add_time_ids``), written to
``assets/tiny_sd2`` (``load_model("tiny-sd2-v")``) / ``assets/tiny_sdxl`` as a ``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline``.

At the end the script checks, on each held-out demo sample, DDIM inversion with w = 1 followed by sampling
with w = 1 and with w = 7.5 (no NTI). ``scripts/measure_tiny.py`` measures the VAE and NTI itself.

    python scripts/train_tiny.py --threads 1                  # sd1: ~30 min on a busy 2-core machine
    python scripts/train_tiny.py --family sd2 --threads 1     # a UNet on the shipped sd1 VAE
    python scripts/train_tiny.py --quick --family sdxl --out /tmp/tiny_sdxl   # smoke run, a few steps

Deterministic given ``--seed`` (and the thread count). Run from the repository root with the package
importable (``pip install -e .[train]``, or ``PYTHONPATH=.``); needs scikit-image, scikit-learn and
matplotlib for the images.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import regex
import torch
import torch.nn.functional as F
from PIL import Image

from nti_lightning.models import tiny
from nti_lightning.models.clip_vocab import byte_symbols, byte_table
from nti_lightning.models.compat import dtype_kwargs
from nti_lightning.models.embedded import (
    SHARED_WEIGHTS,
    drop_shared_weight_files,
    refold_scaling_factor,
    shared_components,
    shares_weights,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_data as td  # noqa: E402

SAMPLES_DIR = tiny.TINY_DIR.parent / "samples"

# ---------------------------------------------------------------------------------------------------------
# Captions of the training images (files in tiny_data.TRAIN_PHOTOS) and of the procedural scenes
# ---------------------------------------------------------------------------------------------------------

CAPTIONS: dict[str, list[str]] = {
    "rocket.jpg": [
        "a photo of a rocket",
        "a rocket launching into the sky",
        "a white rocket lifting off with smoke",
        "a space rocket at the launch pad",
    ],
    "hubble_deep_field.jpg": [
        "a photo of galaxies in deep space",
        "the night sky full of tiny galaxies",
        "a telescope image of distant stars and galaxies",
    ],
    "retina.jpg": [
        "a photo of a retina",
        "an orange fundus photograph of an eye",
        "the back of an eye with red blood vessels",
    ],
    "ihc.png": [
        "a microscope image of stained tissue",
        "brown and blue cells under a microscope",
    ],
    "color.png": ["a colour wheel", "a circle with all the colors of the rainbow"],
    "logo.png": ["a colorful logo on a white background", "a green and blue snake logo"],
    "grace_hopper.jpg": [
        "a portrait of a woman in uniform",
        "an old photo of a woman with medals",
        "a woman in a dark uniform in front of a flag",
    ],
    "Minduka_Present_Blue_Pack.png": ["a blue present with a bow", "a gift box on a white background"],
    "camera.png": [
        "a black and white photo of a man with a camera",
        "a photographer standing behind a camera on a tripod",
        "a man in a coat taking a picture in a park",
    ],
    "grass.png": ["a photo of grass", "long blades of grass", "a close up of a lawn"],
    "gravel.png": ["a photo of gravel", "small stones and pebbles on the ground"],
    "brick.png": ["a photo of a brick wall", "an old brick wall"],
    "cell.png": [
        "a microscope image of a cell",
        "a round cell floating in water",
        "a cell with stripes in the background",
    ],
    "clock_motion.png": ["a blurry photo of a clock", "a wall clock with motion blur"],
    "text.png": ["handwritten equations on a sheet of paper", "a photo of handwriting"],
    "horse.png": ["a silhouette of a horse", "a horse on a white background"],
    "coins.png": ["a photo of old coins", "ancient coins on a table"],
}
SCENE_CAPTIONS = [
    "colorful shapes on a background",
    "an abstract painting with bright colors",
    "a drawing of circles and squares",
    "a colorful pattern",
]
assert set(CAPTIONS) == {name for _, name, *_ in td.TRAIN_PHOTOS}

# Demo photographs, held out of training: (source folder, file, shipped name, caption)
DEMO_SAMPLES: list[tuple[Path, str, str, str]] = [
    (folder, name, shipped, prompt) for folder, name, shipped, prompt in td.EVAL_PHOTOS if shipped is not None
]

# Common English words for the BPE corpus, so that everyday prompt words become single tokens while rare
# words (e.g. "astronaut", "kangaroo") stay split into several, as Prompt-to-Prompt tests need.
COMMON_WORDS = """
a an the of and or in on at to with without from by for into over under above below behind near next
is are was were be been being has have had do does did will would can could should may might must
this that these those it its there here what which who whom whose when where why how all any both each
few more most other some such no nor not only own same so than too very just one two three four five
six seven eight nine ten first last new old good bad big small little large long short high low
young tall wide round flat soft hard hot cold warm cool dark light bright wet dry clean dirty happy sad
beautiful pretty ugly heavy empty full open closed early late fast slow quiet loud simple strange
red orange yellow green blue purple pink brown black white grey gray gold silver colorful
man woman boy girl child children baby person people friend family mother father king queen
cat cats dog dogs bird birds fish horse cow pig sheep goat lion tiger bear wolf fox rabbit mouse
duck chicken monkey elephant zebra giraffe deer snake frog butterfly bee
house home room door window wall floor roof table chair bed sofa desk lamp clock mirror shelf
car bus train truck bike boat ship plane road street bridge city town village park garden farm
tree trees flower flowers leaf leaves grass forest mountain hill river lake sea ocean beach sand
sky sun moon star stars cloud clouds rain snow ice fire water stone rock wood glass paper metal
cup mug bowl plate glass bottle spoon fork knife pot pan box bag basket ball toy book pen
coffee tea milk water juice bread cake apple banana orange pizza soup food fruit cheese egg
hat shirt dress coat shoes jacket suit helmet glasses
photo picture image painting drawing sketch style art cartoon portrait view scene background
head face eye eyes hand hands hair nose mouth ear arm leg
sitting standing lying running walking flying swimming eating drinking sleeping looking
holding wearing playing smiling
day night morning evening summer winter spring autumn
blanket pillow carpet curtain towel
on top side front back left right middle center inside outside around between
""".split()


# ---------------------------------------------------------------------------------------------------------
# 1. Tokenizer
# ---------------------------------------------------------------------------------------------------------


WORD_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
"""CLIP's pre-tokenisation (``CLIPTokenizer.pat`` without the special tokens)."""


def word_counts(corpus: list[str]) -> Counter:
    """Each text as ``CLIPTokenizer`` splits it: NFC, whitespace collapsed, lower case, CLIP's word split, bytes as
    ``byte_table`` symbols, ``</w>`` on a word's last symbol → {word as a tuple of symbols: count}."""
    table = byte_table()
    counts: Counter = Counter()
    for text in corpus:
        text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
        for word in regex.findall(WORD_SPLIT, text):
            symbols = [table[b] for b in word.encode("utf-8")]
            counts[(*symbols[:-1], symbols[-1] + "</w>")] += 1
    return counts


def learn_bpe_merges(words: Counter, max_merges: int) -> list[tuple[str, str]]:
    """Byte-pair encoding (Sennrich et al. 2016): repeatedly merge the most frequent adjacent pair of symbols.

    Ties go to the pair that sorts first, so the merges are a function of the corpus alone (the ``tokenizers``
    trainer breaks ties in hash order: two runs gave two vocabularies)."""
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter = Counter()
        for word, n in words.items():
            out, k = [], 0
            while k < len(word):
                if k + 1 < len(word) and (word[k], word[k + 1]) == best:
                    out.append(word[k] + word[k + 1])
                    k += 2
                else:
                    out.append(word[k])
                    k += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def train_tokenizer(folder: Path) -> None:
    """Trains a byte-level BPE with CLIP's normaliser and word split; writes vocab.json and merges.txt.

    The vocabulary is laid out as CLIP's: 256 byte symbols, the same 256 ending a word (``</w>``), the
    merges in order, then ``<|startoftext|>`` and ``<|endoftext|>``; it has exactly ``tiny.VOCAB_SIZE``
    entries (the merge list is cut to fit, so the least frequent words stay split).
    """
    corpus = []
    for rank, word in enumerate(COMMON_WORDS):  # earlier (more common) words weigh more
        corpus += [word] * (40 - rank // 25)
    captions = [c for cs in CAPTIONS.values() for c in cs] + SCENE_CAPTIONS + [c for *_, c in DEMO_SAMPLES]
    corpus += captions * 2

    merges = learn_bpe_merges(word_counts(corpus), max_merges=tiny.VOCAB_SIZE)

    base = byte_symbols()
    vocab_list = base + [b + "</w>" for b in base]
    seen = set(vocab_list)
    kept = []
    for left, right in merges:
        if len(vocab_list) == tiny.VOCAB_SIZE - 2:
            break
        kept.append((left, right))
        if left + right not in seen:
            seen.add(left + right)
            vocab_list.append(left + right)
    if len(vocab_list) != tiny.VOCAB_SIZE - 2:
        raise RuntimeError(f"BPE corpus too small: {len(vocab_list) + 2} tokens < {tiny.VOCAB_SIZE}")
    vocab_list += [tiny.BOS_TOKEN, tiny.EOS_TOKEN]

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in kept) + "\n")


# ---------------------------------------------------------------------------------------------------------
# 2. VAE
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    seed: int = 0
    vae_steps: int = 2500
    vae_batch: int = 8
    vae_crop: int = 64  # the VAE is convolutional; small crops are 4× cheaper than 128 px
    vae_finetune_steps: int = 500  # then on 128 px crops, the native size
    vae_finetune_batch: int = 2  # the same pixels per step as 8 crops of 64 px
    vae_lr: float = 1e-3  # 2e-3 and 4e-3 fall back to a grey image for hundreds of steps
    vae_min_frac: float = 0.35  # crops of ≥ 35% of a photo's side: detail like the 128 px eval photos
    procedural_fraction: float = 0.2  # share of procedural scenes among the training views
    bank_size: int = 2400  # 128 px training views encoded once for the UNet
    unet_steps: int = 1500
    unet_batch: int = 16
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1


QUICK = dict(vae_steps=5, vae_finetune_steps=2, bank_size=32, unet_steps=5)
FAMILY_UNET_STEPS = {"sdxl": 2500}  # at 1,500 steps its guided replay of chelsea missed by only 8× NTI's error


def cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def init_vae(vae) -> None:
    """Signal-preserving start: every conv / linear weight × √3, the last conv of each residual branch and each
    attention's output projection zeroed (every ResNet block and the mid-block attention start as the identity).

    PyTorch's default init (kaiming-uniform, a = √5) gives each conv an output variance ~1/3 of its input's; over
    the ~12 plain convs of the encoder and decoder's main paths the input hardly reaches the output, and training
    from it sits for ~1,000 steps at a grey image. ×√3 makes the plain convs variance-preserving, and with the
    residual branches at zero the image passes through the whole autoencoder from the first step."""
    for name, module in vae.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.weight.mul_(math.sqrt(3.0))
        if name.endswith("conv2") or name.endswith("to_out.0"):
            module.weight.zero_()
            module.bias.zero_()


def train_vae(vae, bank: td.ImageBank, cfg: TrainSettings) -> None:
    """Autoencoder training on random colour crops: L1 + MSE of ``decode(mean(encode(x)))`` against ``x``, Adam
    with a cosine schedule, from ``init_vae``'s start; the last ``vae_finetune_steps`` on 128 px crops (the
    native size: the GroupNorms and the mid-block attention then see whole images' statistics).

    The posterior's log-variance rows of ``quant_conv`` are pinned to −30 (the value diffusers clamps to),
    so ``latent_dist.sample()`` equals ``latent_dist.mean`` to ~3e-7: a deterministic encoder.
    """
    init_vae(vae)
    with torch.no_grad():
        lc = vae.config.latent_channels
        vae.quant_conv.weight[lc:].zero_()
        vae.quant_conv.bias[lc:].fill_(-30.0)
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    total = cfg.vae_steps + cfg.vae_finetune_steps
    for step in range(total):
        if step < cfg.vae_steps:
            x = bank.batch(cfg.vae_batch, cfg.vae_crop, cfg.vae_min_frac)  # (B, 3, 64, 64)
        else:
            x = bank.batch(cfg.vae_finetune_batch, tiny.IMAGE_SIZE, cfg.vae_min_frac)  # (b, 3, 128, 128)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, cfg.vae_lr)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            vae.quant_conv.weight.grad[lc:].zero_()
            vae.quant_conv.bias.grad[lc:].zero_()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 250 == 0 or step == total - 1:
            print(f"  vae step {step:4d}  loss {loss.item():.4f}", flush=True)
    vae.eval()


@torch.no_grad()
def rescale_latent_space(vae, views: torch.Tensor) -> float:
    """Folds a scale s into quant_conv / post_quant_conv so that scaling_factor · E(x) has unit std.

    E'(x) = s·E(x) (mean rows of quant_conv × s, log-variance bias + 2 log s); D'(z) = D(z / s) (the
    input side of post_quant_conv ÷ s). Decoding of an encoding is unchanged up to float rounding.
    """
    lc = vae.config.latent_channels
    sf = vae.config.scaling_factor
    std = torch.cat([vae.encode(b).latent_dist.mean for b in views.split(64)]).std().item()
    s = 1.0 / (sf * std)
    vae.quant_conv.weight[:lc] *= s
    vae.quant_conv.bias[:lc] *= s
    vae.quant_conv.bias[lc:] += 2 * math.log(s)
    vae.post_quant_conv.weight /= s
    return s


# ---------------------------------------------------------------------------------------------------------
# 3. UNet: one trainer for the three families
# ---------------------------------------------------------------------------------------------------------


class TextConditioner:
    """A family's text conditioning: the UNet's ``encoder_hidden_states`` and, for SDXL, ``added_cond_kwargs``.

    sd1 / sd2: ψ(P) = the text encoder's last hidden state (77, D), as StableDiffusionPipeline.
    sdxl: the penultimate hidden states of both encoders concatenated (77, 2D), the pooled, projected
    ``text_embeds`` of ``text_encoder_2``, and ``time_ids`` = (original h, w, crop top, left, target h, w),
    as StableDiffusionXLPipeline.
    """

    def __init__(self, family: str, tokenizer, text_encoder, text_encoder_2=None):
        self.family, self.tokenizer, self.te, self.te2 = family, tokenizer, text_encoder, text_encoder_2

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids  # (N, 77)
        if self.family != "sdxl":
            return self.te(ids)[0], None  # (N, 77, D)
        h1 = self.te(ids, output_hidden_states=True).hidden_states[-2]
        out2 = self.te2(ids, output_hidden_states=True)
        return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds  # (N, 77, 2D), (N, D)

    @staticmethod
    def time_ids(n: int, original: int = tiny.IMAGE_SIZE) -> torch.Tensor:
        s = tiny.IMAGE_SIZE
        return torch.tensor([[original, original, 0, 0, s, s]] * n, dtype=torch.float32)


def unet_forward(unet, family: str, z, t, context, pooled=None, time_ids=None):
    if family != "sdxl":
        return unet(z, t, context).sample
    return unet(z, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def train_unet(
    unet,
    family: str,
    latents: torch.Tensor,
    caption_ids: list[list[int]],
    text: tuple[torch.Tensor, torch.Tensor | None],
    null_index: int,
    alphas_cumprod: torch.Tensor,
    cfg: TrainSettings,
    rng: np.random.Generator,
    original_sizes: torch.Tensor | None = None,
) -> None:
    """Denoiser training with SD's betas and caption dropout to "" (Ho & Salimans): the loss is the MSE to ε
    (sd1, sdxl; Ho et al. 2020, eq. 14) or to v = √ᾱ ε − √(1 − ᾱ) z₀ (sd2, Salimans & Ho 2022)."""
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    text_emb, pooled_emb = text
    unet.train()
    for step in range(cfg.unet_steps):
        idx = rng.integers(0, len(latents), cfg.unet_batch)
        z0 = latents[idx]  # (B, 4, 16, 16)
        cap = [null_index if rng.random() < cfg.caption_dropout else int(rng.choice(caption_ids[i])) for i in idx]
        context = text_emb[cap]  # (B, 77, D)
        pooled = pooled_emb[cap] if pooled_emb is not None else None
        time_ids = None
        if family == "sdxl":
            time_ids = TextConditioner.time_ids(len(idx))
            if original_sizes is not None:
                time_ids[:, :2] = original_sizes[idx, None].float()
        t = torch.randint(0, len(alphas_cumprod), (cfg.unet_batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise  # q(z_t | z_0)
        target = a.sqrt() * noise - (1 - a).sqrt() * z0 if family == "sd2" else noise
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.unet_steps, cfg.unet_lr)
        loss = F.mse_loss(unet_forward(unet, family, zt, t, context, pooled, time_ids), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            print(f"  unet step {step:4d}  loss {loss.item():.4f}", flush=True)
    unet.eval()


# ---------------------------------------------------------------------------------------------------------
# 4. Check: DDIM inversion and reconstruction without NTI
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def check_inversion(pipe, family: str, num_steps: int = 50, guidance: float = 7.5) -> list[dict]:
    """PSNR against the VAE round trip of DDIM inversion (w = 1) then sampling with w = 1 and w = guidance."""
    sched = pipe.scheduler
    sched.set_timesteps(num_steps)
    ac = sched.alphas_cumprod
    step = sched.config.num_train_timesteps // num_steps
    v_pred = sched.config.prediction_type == "v_prediction"
    cond_text = TextConditioner(family, pipe.tokenizer, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))

    def alpha(t: int) -> torch.Tensor:
        return ac[t] if t >= 0 else sched.final_alpha_cumprod

    def eps_of(z, t, ctx, pooled):
        n = len(z)
        out = unet_forward(
            pipe.unet, family, z, t, ctx, pooled, TextConditioner.time_ids(n) if pooled is not None else None
        )
        return alpha(t).sqrt() * out + (1 - alpha(t)).sqrt() * z if v_pred else out  # v → ε

    def transition(z, eps, a_from, a_to):  # DDIM, eq. 12 with η = 0
        return a_to.sqrt() * (z - (1 - a_from).sqrt() * eps) / a_from.sqrt() + (1 - a_to).sqrt() * eps

    rows = []
    for name, prompt in read_captions():
        x = td.to_tensor(Image.open(SAMPLES_DIR / name).convert("RGB").resize((tiny.IMAGE_SIZE,) * 2))[None]
        sf = pipe.vae.config.scaling_factor
        z0 = pipe.vae.encode(x).latent_dist.mean * sf  # (1, 4, 16, 16)
        round_trip = pipe.vae.decode(z0 / sf).sample
        (cond, pc), (uncond, pu) = cond_text.encode([prompt]), cond_text.encode([""])
        z = z0
        for t in reversed(sched.timesteps.tolist()):  # 1, 21, …, 981
            z = transition(z, eps_of(z, t, cond, pc), alpha(t - step), alpha(t))
        row = {"image": name, "vae_vs_input": td.psnr(round_trip, x)}
        both = torch.cat([uncond, cond])
        both_pooled = torch.cat([pu, pc]) if pc is not None else None
        for w in (1.0, guidance):
            zs = z
            for t in sched.timesteps.tolist():  # 981, …, 1
                eps_u, eps_c = eps_of(torch.cat([zs, zs]), t, both, both_pooled).chunk(2)
                zs = transition(zs, eps_u + w * (eps_c - eps_u), alpha(t), alpha(t - step))
            row[f"w={w:g}"] = td.psnr(pipe.vae.decode(zs / sf).sample, round_trip)
        rows.append(row)
        print("  " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else str(v) for k, v in row.items()), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def write_samples() -> None:
    """Demo photographs as 256×256 centre crops and ``captions.jsonl``."""
    SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    lines = []
    for folder, source, name, prompt in DEMO_SAMPLES:
        td.centre_crop(td.load_rgb(folder, source), 256).save(SAMPLES_DIR / name, optimize=True)
        lines.append(json.dumps({"image": name, "prompt": prompt}))
    (SAMPLES_DIR / "captions.jsonl").write_text("\n".join(lines) + "\n")


def read_captions() -> list[tuple[str, str]]:
    lines = (SAMPLES_DIR / "captions.jsonl").read_text().splitlines()
    return [(r["image"], r["prompt"]) for r in map(json.loads, filter(None, lines))]


def build_bank_views(
    bank: td.ImageBank, n: int, rng: np.random.Generator
) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """n random 128 px views for the UNet: → (views, caption group per view, original crop side per view).

    Caption group k < len(CAPTIONS) is photograph k; the last group is the procedural scenes."""
    views, groups, sides = [], [], []
    for _ in range(n):
        views.append(bank.view(tiny.IMAGE_SIZE, min_frac=0.35))
        groups.append(bank.last_source if bank.last_source >= 0 else len(CAPTIONS))
        sides.append(bank.last_side)
    return torch.stack(views), groups, torch.tensor(sides)


def save_folder(pipe, out: Path, keep: tuple[str, ...] = ()) -> None:
    """save_pretrained into ``out``, keeping README.md / LICENSE already there; other files in the components'
    folders that this save does not write are removed (stale ones would shadow or contradict the new ones),
    except those named in ``keep`` (paths relative to ``out``)."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        written = {entry.relative_to(tmp) for entry in Path(tmp).rglob("*") if entry.is_file()}
        for sub in {path.parts[0] for path in written if len(path.parts) > 1}:
            for old in sorted((out / sub).rglob("*")) if (out / sub).is_dir() else []:
                rel = old.relative_to(out)
                if old.is_file() and rel not in written and str(rel) not in keep:
                    old.unlink()
        for rel in sorted(written):
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / rel, target)
    for name in ("text_encoder", "text_encoder_2"):
        if (out / name / "model.safetensors").is_file():
            prefix_text_model_keys(out / name / "model.safetensors")


def prefix_text_model_keys(path: Path) -> None:
    """Stores a CLIPTextModel's weights under ``text_model.*``, as every SD checkpoint does: transformers 5 saves
    them without the prefix and reads both, transformers 4 silently leaves unprefixed weights random."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    heads = ("text_model.", "text_projection.")  # CLIPTextModelWithProjection's projection sits beside text_model
    save_file({k if k.startswith(heads) else f"text_model.{k}": v for k, v in state.items()}, str(path), metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=tiny.FAMILIES, default="sd1")
    parser.add_argument("--out", type=Path, help="diffusers folder to write (default: the family's shipped folder)")
    parser.add_argument(
        "--base", type=Path, default=tiny.TINY_DIR, help="sd2/sdxl: the sd1 folder whose tokenizer and VAE to reuse"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is faster on a busy machine)")
    parser.add_argument("--vae-steps", type=int)
    parser.add_argument("--unet-steps", type=int)
    args = parser.parse_args()
    family = args.family
    out = (args.out or tiny.FAMILY_DIR[family]).resolve()
    cfg = TrainSettings(seed=args.seed)
    if args.quick:
        if out in tiny.FAMILY_DIR.values():
            parser.error("--quick needs --out elsewhere than a shipped model folder")
        cfg = replace(cfg, **QUICK)
    if args.vae_steps is not None:
        cfg = replace(cfg, vae_steps=args.vae_steps)
    if args.unet_steps is not None:
        cfg = replace(cfg, unet_steps=args.unet_steps)
    elif family in FAMILY_UNET_STEPS and not args.quick:
        cfg = replace(cfg, unet_steps=FAMILY_UNET_STEPS[family])
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    start = time.time()
    timings = {}

    # 1. Tokenizer (sd1) or the base folder's; the seeded random components built on it
    out.mkdir(parents=True, exist_ok=True)
    if family == "sd1":
        print("1. tokenizer", flush=True)
        tok_dir = out / "tokenizer"
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        train_tokenizer(tok_dir)
    else:
        tok_dir = args.base / "tokenizer"
        print(f"1. tokenizer and VAE from {args.base}", flush=True)
    tokenizer = tiny.build_tokenizer(tok_dir, pad_token=tiny.SD2_PAD_TOKEN if family == "sd2" else tiny.EOS_TOKEN)
    vae = None
    if family != "sd1":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.base / "vae", **dtype_kwargs(torch.float32)).eval()
        if family == "sdxl":  # SDXL's VAE config: scaling_factor 0.13025, force_upcast (same latents)
            refold_scaling_factor(vae, tiny.SDXL_SCALING_FACTOR, force_upcast=True)
    components = tiny.build_random_family_components(family, cfg.seed, tokenizer=tokenizer, vae=vae)
    vae, unet, text_encoder = components["vae"], components["unet"], components["text_encoder"]
    text_encoder.requires_grad_(False)
    if components.get("text_encoder_2") is not None:
        components["text_encoder_2"].requires_grad_(False)
    vae.requires_grad_(family == "sd1")
    bank = td.ImageBank(rng, procedural_fraction=cfg.procedural_fraction)

    # 2. VAE (sd1 only): autoencoder, then exact rescaling of the latent space
    s = None
    if family == "sd1":
        if not args.quick and out == tiny.TINY_DIR:
            write_samples()
        print(f"2. vae ({sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters)", flush=True)
        train_vae(vae, bank, cfg)
        vae.requires_grad_(False)
    views, groups, sides = build_bank_views(bank, cfg.bank_size, rng)  # (N, 3, 128, 128)
    if family == "sd1":
        s = rescale_latent_space(vae, views)
    with torch.no_grad():
        sf = vae.config.scaling_factor
        latents = torch.cat([vae.encode(b).latent_dist.mean for b in views.split(64)]) * sf  # (N, 4, 16, 16)
    print(
        f"  scaled latents mean {latents.mean():.3f} std {latents.std():.3f}"
        + (f"; folded scale {s:.4f}" if s else ""),
        flush=True,
    )
    timings["vae_minutes"] = round((time.time() - start) / 60, 2)
    if family == "sd1":  # written now (as saved at the end: fp16) so that --family sd2 / sdxl can start on it
        copy.deepcopy(vae).half().save_pretrained(out / "vae", safe_serialization=True)
        print(f"  vae written to {out / 'vae'}", flush=True)

    # 3. UNet on the latents, with caption dropout
    print(f"3. unet ({family}, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters)", flush=True)
    groups_captions = list(CAPTIONS.values()) + [SCENE_CAPTIONS]
    captions = [c for cs in groups_captions for c in cs]
    cond = TextConditioner(family, tokenizer, text_encoder, components.get("text_encoder_2"))
    text = cond.encode(captions + [""])  # (K + 1, 77, D) [, (K + 1, D)]
    first = np.cumsum([0] + [len(cs) for cs in groups_captions])
    caption_ids = [list(range(first[g], first[g + 1])) for g in groups]
    scheduler = components["scheduler"]
    t_unet = time.time()
    train_unet(unet, family, latents, caption_ids, text, len(captions), scheduler.alphas_cumprod, cfg, rng, sides)
    timings["unet_minutes"] = round((time.time() - t_unet) / 60, 2)
    train_minutes = (time.time() - start) / 60
    timings["train_minutes"] = round(train_minutes, 2)
    print(f"  trained in {train_minutes:.1f} min", flush=True)

    # 4. Save as a standard diffusers folder: UNet and VAE in fp16 (diffusers loads them as fp32),
    #    text encoders in fp32 (transformers keeps the stored dtype)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae.half(),
            text_encoder=text_encoder,
            text_encoder_2=components["text_encoder_2"],
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet.half(),
            scheduler=scheduler,
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae.half(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet.half(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    tokenizer_dirs = ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",)
    save_folder(pipe, out, keep=tuple(f"{d}/{n}" for d in tokenizer_dirs for n in ("vocab.json", "merges.txt")))
    for d in tokenizer_dirs:  # transformers 4's CLIPTokenizer reads these two files, not tokenizer.json
        for name in ("vocab.json", "merges.txt"):
            if tok_dir.resolve() != (out / d).resolve():
                shutil.copyfile(tok_dir / name, out / d / name)
    if shares_weights(out):  # a shipped folder: the VAE (and SDXL's first text encoder) stay in assets/tiny only
        for f in drop_shared_weight_files(out):
            print(f"  {f.relative_to(out)} removed: loaded from {SHARED_WEIGHTS[out.name]}", flush=True)

    # 5. Check on the held-out demo samples, with the weights as saved
    print("5. check (PSNR vs VAE round trip, dB)", flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shared = shared_components(out)
    if family == "sdxl":
        loaded = StableDiffusionXLPipeline.from_pretrained(out, add_watermarker=False, **shared)
    else:
        loaded = StableDiffusionPipeline.from_pretrained(
            out, safety_checker=None, requires_safety_checker=False, **shared
        )
    rows = check_inversion(loaded, family)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    report = {
        "family": family,
        **timings,
        "folder_mib": round(size / 2**20, 2),
        "settings": vars(cfg),
        "latent_scale_folded": s,
        "check": rows,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
