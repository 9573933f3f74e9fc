"""Trains and writes the embedded default model, ``nti_lightning/assets/tiny/``, and the demo samples.

The package ships a tiny Stable-Diffusion-shaped pipeline (``nti_lightning/models/tiny.py``) so that
Null-text Inversion (Mokady et al. 2023) can be run and tested offline. Random weights say nothing about the
method (a random UNet is no denoiser), so this script gives them about ten CPU minutes of training on
public-domain / CC0 photographs shipped with scikit-image:

1. Tokenizer: a byte-level BPE in CLIP's format (``vocab.json`` + ``merges.txt``), trained on the captions
   and a list of common English words, loaded with ``transformers.CLIPTokenizer``.
2. VAE: an autoencoder on random crops (posterior std pinned to ~0), then the latent space is rescaled
   exactly (a scale folded into ``quant_conv`` / ``post_quant_conv``) so that ``scaling_factor · E(x)``
   has unit standard deviation, with SD1.x's ``scaling_factor = 0.18215``.
3. UNet: ε-prediction with SD1.x's betas on those latents, 10% of captions dropped to "" so that
   classifier-free guidance has an unconditional branch to push away from.
4. Text encoder: seeded random (``build_random_components``) and frozen.

The demo photographs (``assets/samples/``) are held out of training. At the end the script measures, on
each demo sample, DDIM inversion with w = 1 followed by sampling with w = 1 and with w = 7.5 (no NTI).

    python scripts/train_tiny.py                           # ~15 min on 2 CPU threads
    python scripts/train_tiny.py --quick --out /tmp/tiny   # a smoke run of a few steps

Run from the repository root with the package importable (``pip install -e .[train]``, or
``PYTHONPATH=.``); needs scikit-image for the photographs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from tokenizers import Regex as TokRegex
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from nti_lightning.models import tiny

SKIMAGE_DATA = Path(skimage.__file__).resolve().parent / "data"
SAMPLES_DIR = tiny.TINY_DIR.parent / "samples"

# ---------------------------------------------------------------------------------------------------------
# Data: scikit-image photographs, all public domain or CC0 (see skimage.data docstrings)
# ---------------------------------------------------------------------------------------------------------

TRAIN_IMAGES: dict[str, list[str]] = {
    "rocket.jpg": [  # SpaceX launch of DSCOVR, public domain
        "a photo of a rocket",
        "a rocket launching into the sky",
        "a white rocket lifting off with smoke",
        "a space rocket at the launch pad",
    ],
    "hubble_deep_field.jpg": [  # NASA Hubble eXtreme Deep Field, public domain
        "a photo of galaxies in deep space",
        "the night sky full of tiny galaxies",
        "a telescope image of distant stars and galaxies",
    ],
    "retina.jpg": [  # fundus photograph by Mikael Häggström, CC0
        "a photo of a retina",
        "an orange fundus photograph of an eye",
        "the back of an eye with red blood vessels",
    ],
    "camera.png": [  # "camera" by Lav Varshney, CC0
        "a black and white photo of a man with a camera",
        "a photographer standing behind a camera on a tripod",
        "a man in a coat taking a picture in a park",
    ],
    "grass.png": [  # CC0 (DeviantArt, linolafett)
        "a black and white photo of grass",
        "long blades of grass",
        "a close up of a lawn",
    ],
    "gravel.png": [  # CC0 (cc0textures.com)
        "a black and white photo of gravel",
        "small stones and pebbles on the ground",
    ],
    "brick.png": [  # CC0 (cc0textures.com)
        "a photo of a brick wall",
        "an old grey brick wall",
    ],
    "cell.png": [  # quantitative phase image by Paul Müller, CC0
        "a microscope image of a cell",
        "a round cell floating in water",
        "a grey cell with stripes in the background",
    ],
    "clock_motion.png": [  # by Stefan van der Walt, public domain
        "a blurry photo of a clock",
        "a wall clock with motion blur",
    ],
    "text.png": [  # Wikipedia "Corner.png", public domain
        "handwritten equations on a sheet of paper",
        "a black and white photo of handwriting",
    ],
    "horse.png": [  # openclipart, Andreas Preuss, CC0
        "a black silhouette of a horse",
        "a horse on a white background",
    ],
}

# Demo photographs, held out of training: (source file, shipped name, caption)
DEMO_SAMPLES: list[tuple[str, str, str]] = [
    ("chelsea.png", "cat.png", "a photo of a cat"),  # Chelsea the cat, Stefan van der Walt, CC0
    ("coffee.png", "coffee.png", "a cup of coffee on a table"),  # Rachel Michetti, CC0
    ("astronaut.png", "astronaut.png", "a photo of an astronaut"),  # NASA, public domain
]

# Common English words for the BPE corpus, so that everyday prompt words become single tokens while rare
# caption words (e.g. "astronaut", "microscope") stay split into several, as Prompt-to-Prompt tests need.
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


def load_photo(name: str) -> Image.Image:
    """An RGB PIL image from scikit-image's data folder (grey images replicated, alpha over white)."""
    image = Image.open(SKIMAGE_DATA / name)
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image)
    return image.convert("RGB")


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """Square centre crop resized with Pillow's default (bicubic), as the authors prepare images."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → (3, H, W) in [-1, 1] (x / 127.5 − 1)."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def random_view(image: Image.Image, size: int, rng: np.random.Generator, min_frac: float) -> torch.Tensor:
    """A random square crop (side ∈ [min_frac, 1] × short side), resized to ``size``, maybe flipped."""
    w, h = image.size
    side = int(min(w, h) * rng.uniform(min_frac, 1.0))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    view = image.crop((left, top, left + side, top + side)).resize((size, size))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(view)


# ---------------------------------------------------------------------------------------------------------
# 1. Tokenizer
# ---------------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) reversible byte → printable character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def train_tokenizer(folder: Path) -> None:
    """Trains a byte-level BPE with CLIP's normaliser and word split; writes vocab.json and merges.txt.

    The vocabulary is laid out as CLIP's: 256 byte symbols, the same 256 ending a word (``</w>``), the
    merges in order, then ``<|startoftext|>`` and ``<|endoftext|>``; it has exactly ``tiny.VOCAB_SIZE``
    entries (the merge list is cut to fit, so the least frequent words stay split).
    """
    corpus = []
    for rank, word in enumerate(COMMON_WORDS):  # earlier (more common) words weigh more
        corpus += [word] * (40 - rank // 25)
    captions = [c for cs in TRAIN_IMAGES.values() for c in cs] + [c for _, _, c in DEMO_SAMPLES]
    corpus += captions * 2

    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(TokRegex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                TokRegex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]
    ]

    base = bytes_to_unicode()
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
    vae_steps: int = 600
    vae_batch: int = 8
    vae_crop: int = 64  # the VAE is convolutional; small crops are 4× cheaper than 128 px
    vae_lr: float = 2e-3
    bank_size: int = 2400  # 128 px training views encoded once for the UNet
    unet_steps: int = 1500
    unet_batch: int = 16
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1


def cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, photos: list[Image.Image], cfg: TrainSettings, rng: np.random.Generator) -> None:
    """Autoencoder training on random crops: L1 + MSE of ``decode(mean(encode(x)))`` against ``x``.

    The posterior's log-variance rows of ``quant_conv`` are pinned to −30 (the value diffusers clamps to),
    so ``latent_dist.sample()`` equals ``latent_dist.mean`` to ~3e-7: a deterministic encoder.
    """
    with torch.no_grad():
        lc = vae.config.latent_channels
        vae.quant_conv.weight[lc:].zero_()
        vae.quant_conv.bias[lc:].fill_(-30.0)
    params = [p for n, p in vae.named_parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(cfg.vae_steps):
        x = torch.stack(
            [random_view(photos[rng.integers(len(photos))], cfg.vae_crop, rng, 0.15) for _ in range(cfg.vae_batch)]
        )  # (B, 3, 64, 64)
        if rng.random() < 0.5:  # colour augmentation: most training photos are grey
            x = x[:, torch.from_numpy(rng.permutation(3))]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.vae_steps, cfg.vae_lr)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            vae.quant_conv.weight.grad[lc:].zero_()
            vae.quant_conv.bias.grad[lc:].zero_()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
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
# 3. UNet
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """ψ(P): the text encoder's last hidden state for prompts padded and truncated to 77 tokens."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids  # (N, 77)
    return text_encoder(ids)[0]  # (N, 77, D)


def train_unet(
    unet,
    latents: torch.Tensor,
    caption_ids: list[list[int]],
    text_emb: torch.Tensor,
    null_index: int,
    alphas_cumprod: torch.Tensor,
    cfg: TrainSettings,
    rng: np.random.Generator,
) -> None:
    """ε-prediction (Ho et al. 2020, eq. 14) with SD1.x's betas and caption dropout to "" (Ho & Salimans)."""
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    unet.train()
    for step in range(cfg.unet_steps):
        idx = rng.integers(0, len(latents), cfg.unet_batch)
        z0 = latents[idx]  # (B, 4, 16, 16)
        cap = [null_index if rng.random() < cfg.caption_dropout else int(rng.choice(caption_ids[i])) for i in idx]
        context = text_emb[cap]  # (B, 77, D)
        t = torch.randint(0, len(alphas_cumprod), (cfg.unet_batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise  # q(z_t | z_0)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.unet_steps, cfg.unet_lr)
        loss = F.mse_loss(unet(zt, t, context).sample, noise)
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


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1], measured on [0, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def check_inversion(pipe: StableDiffusionPipeline, num_steps: int = 50, guidance: float = 7.5) -> list[dict]:
    """PSNR against the VAE round trip of DDIM inversion (w = 1) then sampling with w = 1 and w = guidance."""
    sched = pipe.scheduler
    sched.set_timesteps(num_steps)
    ac = sched.alphas_cumprod
    step = sched.config.num_train_timesteps // num_steps

    def alpha(t: int) -> torch.Tensor:
        return ac[t] if t >= 0 else sched.final_alpha_cumprod

    def transition(z, eps, a_from, a_to):  # DDIM, eq. 12 with η = 0
        return a_to.sqrt() * (z - (1 - a_from).sqrt() * eps) / a_from.sqrt() + (1 - a_to).sqrt() * eps

    rows = []
    for name, prompt in read_captions():
        x = to_tensor(Image.open(SAMPLES_DIR / name).convert("RGB").resize((tiny.IMAGE_SIZE,) * 2))[None]
        sf = pipe.vae.config.scaling_factor
        z0 = pipe.vae.encode(x).latent_dist.mean * sf  # (1, 4, 16, 16)
        round_trip = pipe.vae.decode(z0 / sf).sample
        cond = encode_text(pipe.tokenizer, pipe.text_encoder, [prompt])
        uncond = encode_text(pipe.tokenizer, pipe.text_encoder, [""])
        z = z0
        for t in reversed(sched.timesteps.tolist()):  # 1, 21, …, 981
            z = transition(z, pipe.unet(z, t, cond).sample, alpha(t - step), alpha(t))
        row = {"image": name, "vae_vs_input": psnr(round_trip, x)}
        for w in (1.0, guidance):
            zs = z
            for t in sched.timesteps.tolist():  # 981, …, 1
                eps_u, eps_c = pipe.unet(torch.cat([zs, zs]), t, torch.cat([uncond, cond])).sample.chunk(2)
                eps = eps_u + w * (eps_c - eps_u)
                zs = transition(zs, eps, alpha(t), alpha(t - step))
            row[f"w={w:g}"] = psnr(pipe.vae.decode(zs / sf).sample, round_trip)
        rows.append(row)
        print("  " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else str(v) for k, v in row.items()))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def write_samples() -> None:
    """Demo photographs as 256×256 centre crops and ``captions.jsonl``."""
    SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    lines = []
    for source, name, prompt in DEMO_SAMPLES:
        centre_crop(load_photo(source), 256).save(SAMPLES_DIR / name, optimize=True)
        lines.append(json.dumps({"image": name, "prompt": prompt}))
    (SAMPLES_DIR / "captions.jsonl").write_text("\n".join(lines) + "\n")


def read_captions() -> list[tuple[str, str]]:
    lines = (SAMPLES_DIR / "captions.jsonl").read_text().splitlines()
    return [(r["image"], r["prompt"]) for r in map(json.loads, filter(None, lines))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=tiny.TINY_DIR, help="diffusers folder to write")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy machine)")
    args = parser.parse_args()
    cfg = TrainSettings()
    if args.quick:
        if args.out.resolve() == tiny.TINY_DIR:
            parser.error("--quick needs --out elsewhere than the shipped model folder")
        cfg = TrainSettings(vae_steps=5, bank_size=32, unet_steps=5)
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    start = time.time()

    # 1. Tokenizer files, and the seeded random components built on them
    print("1. tokenizer", flush=True)
    tok_dir = args.out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    train_tokenizer(tok_dir)
    tokenizer = tiny.build_tokenizer(tok_dir)
    components = tiny.build_random_components(cfg.seed, tokenizer=tokenizer)
    vae, unet, text_encoder = components["vae"], components["unet"], components["text_encoder"]
    text_encoder.requires_grad_(False)
    write_samples()

    # 2. VAE: autoencoder, then exact rescaling of the latent space
    print("2. vae", flush=True)
    photos = [load_photo(name) for name in TRAIN_IMAGES]
    train_vae(vae, photos, cfg, rng)
    owner = rng.integers(0, len(photos), cfg.bank_size)
    views = torch.stack([random_view(photos[i], tiny.IMAGE_SIZE, rng, 0.35) for i in owner])  # (N, 3, 128, 128)
    s = rescale_latent_space(vae, views)
    with torch.no_grad():
        sf = vae.config.scaling_factor
        latents = torch.cat([vae.encode(b).latent_dist.mean for b in views.split(64)]) * sf  # (N, 4, 16, 16)
    print(f"  folded scale {s:.4f}; scaled latents mean {latents.mean():.3f} std {latents.std():.3f}", flush=True)

    # 3. UNet on the latents, with caption dropout
    print("3. unet", flush=True)
    captions = [c for cs in TRAIN_IMAGES.values() for c in cs]
    text_emb = encode_text(tokenizer, text_encoder, captions + [""])  # (K + 1, 77, D)
    first = np.cumsum([0] + [len(cs) for cs in TRAIN_IMAGES.values()])
    caption_ids = [list(range(first[i], first[i + 1])) for i in owner]
    scheduler = components["scheduler"]
    train_unet(unet, latents, caption_ids, text_emb, len(captions), scheduler.alphas_cumprod, cfg, rng)
    train_minutes = (time.time() - start) / 60
    print(f"  trained in {train_minutes:.1f} min", flush=True)

    # 4. Save as a standard diffusers folder: UNet and VAE in fp16 (diffusers loads them as fp32),
    #    text encoder in fp32 (transformers keeps the stored dtype)
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
    with tempfile.TemporaryDirectory() as tmp:  # keep README.md / LICENSE beside the components
        pipe.save_pretrained(tmp, safe_serialization=True)
        for entry in sorted(Path(tmp).rglob("*")):  # tokenizer/ keeps its vocab.json and merges.txt
            target = args.out / entry.relative_to(tmp)
            if entry.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                shutil.copyfile(entry, target)

    # 5. Check on the held-out demo samples, with the weights as shipped
    print("5. check (PSNR vs VAE round trip, dB)", flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loaded = StableDiffusionPipeline.from_pretrained(args.out, safety_checker=None, requires_safety_checker=False)
    rows = check_inversion(loaded)
    report = {"train_minutes": round(train_minutes, 2), "settings": vars(cfg), "latent_scale_folded": s, "check": rows}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
