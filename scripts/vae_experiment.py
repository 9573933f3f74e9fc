"""VAE recipe experiments for the embedded tiny model (issue #15): train an AutoencoderKL of ``tiny.VAE_CONFIG``
shape (or other widths) on ``tiny_data.ImageBank`` crops and print the held-out photographs' mean PSNR and
chroma kept every ``--every`` steps (raw weights, and their moving average with ``--ema``).

    python scripts/vae_experiment.py --name base --minfrac 0.35 --proc 0.2 --steps 2000 --every 500
    python scripts/vae_experiment.py --name shipped --widths 32,32,64,64 --init signal --lr 1e-3 --minfrac 0.35 \
        --proc 0.2 --steps 3000 --finetune-steps 500 --every 500     # the shipped recipe (train_tiny.TrainSettings)

One thread. The recipes tried and what they gave are in docs/tiny_model.md.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import tiny_data as td  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from measure_tiny import measure_vae  # noqa: E402
from train_tiny import cosine_lr, init_vae  # noqa: E402

from nti_lightning.models import tiny  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--widths", default="16,32,64,64")
p.add_argument("--layers", type=int, default=1)
p.add_argument("--steps", type=int, default=3000)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--crop", type=int, default=64)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--loss", default="l1mse")
p.add_argument("--every", type=int, default=250)
p.add_argument("--minfrac", type=float, default=0.1)
p.add_argument("--proc", type=float, default=0.35)
p.add_argument("--noattn", action="store_true")
p.add_argument("--groups", type=int, default=8)
p.add_argument("--save")
p.add_argument("--zeroinit", action="store_true")
p.add_argument("--ema", type=float, default=0.0)
p.add_argument("--constch", type=float, default=0.0)
p.add_argument("--init", choices=("default", "signal"), default="default", help="signal: train_tiny.init_vae")
p.add_argument("--finetune-steps", type=int, default=0, help="the last steps of --steps on 128 px crops")
p.add_argument("--finetune-batch", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(1)
rng = np.random.default_rng(0)
cfg = {
    **tiny.VAE_CONFIG,
    "block_out_channels": tuple(int(w) for w in a.widths.split(",")),
    "layers_per_block": a.layers,
    "norm_num_groups": a.groups,
}
if a.noattn:
    cfg["mid_block_add_attention"] = False
vae = AutoencoderKL(**cfg)
if a.init == "signal":
    init_vae(vae)
lc = 4
with torch.no_grad():
    vae.quant_conv.weight[lc:].zero_()
    vae.quant_conv.bias[lc:].fill_(-30.0)
if a.zeroinit:
    with torch.no_grad():
        for n, m in vae.named_modules():
            if n.endswith("conv2") or n.endswith("to_out.0"):
                m.weight.zero_()
                m.bias.zero_()
if a.constch:
    K = a.constch
    with torch.no_grad():
        for res, norm, out in [
            (vae.encoder.mid_block.resnets[-1], vae.encoder.conv_norm_out, vae.encoder.conv_out),
            (vae.decoder.up_blocks[-1].resnets[-1], vae.decoder.conv_norm_out, vae.decoder.conv_out),
        ]:
            C = norm.num_channels
            G = norm.num_groups
            n = C // G
            js = [g * n for g in range(G)]
            sig = [c for c in range(C) if c not in js]
            res.conv2.weight[js] = 0
            res.conv2.bias[js] = K
            norm.weight[js] = 0
            norm.bias[js] = 0
            std = K * (n - 1) ** 0.5 / n
            norm.weight[sig] = std
            norm.bias[sig] = K / n
            out.weight[:, js] = 0
params = list(vae.parameters())
print(a.name, sum(p.numel() for p in params) / 1e6, "M", flush=True)
ema = copy.deepcopy(vae).eval() if a.ema else None
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
bank = td.ImageBank(rng, procedural_fraction=a.proc)
bic = np.mean([td.psnr(td.bicubic_down_up(x, 8), x) for _, x in td.eval_images(128)])


def evaluate(vae=vae):
    """Mean PSNR, lowest chroma kept, per-photo PSNRs (``measure_tiny.measure_vae``); leaves ``vae`` training."""
    rows = measure_vae(vae.eval())
    vae.train()
    return (
        float(np.mean([r["vae_psnr"] for r in rows])),
        min(r["vae_chroma"] for r in rows),
        [round(r["vae_psnr"], 2) for r in rows],
    )


def lr_at(step):
    return cosine_lr(step, a.steps, a.lr)


t0 = time.time()
vae.train()
for step in range(a.steps):
    if step < a.steps - a.finetune_steps:
        x = bank.batch(a.batch, a.crop, a.minfrac)
    else:  # the native size: GroupNorm statistics and the mid-block attention over whole images
        x = bank.batch(a.finetune_batch, tiny.IMAGE_SIZE, a.minfrac)
    for g in opt.param_groups:
        g["lr"] = lr_at(step)
    r = vae.decode(vae.encode(x).latent_dist.mean).sample
    loss = F.mse_loss(r, x) if a.loss == "mse" else F.l1_loss(r, x) + F.mse_loss(r, x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    vae.quant_conv.weight.grad[lc:].zero_()
    vae.quant_conv.bias.grad[lc:].zero_()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if ema is not None:
        d = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pv in zip(ema.parameters(), vae.parameters()):
                pe.lerp_(pv, 1 - d)
    if (step + 1) % a.every == 0 or step + 1 == a.steps:
        if ema is not None:
            m2, c2, ps2 = evaluate(ema)
            ema.eval()
            print(f"{a.name} EMA step {step + 1} psnr {m2:.2f} minchroma {c2:.2f} {ps2}", flush=True)
        m, c, ps = evaluate()
        print(
            f"{a.name} step {step + 1} t {time.time() - t0:.0f}s loss {loss.item():.4f} psnr {m:.2f} "
            f"(bic {bic:.2f}) minchroma {c:.2f} {ps}",
            flush=True,
        )
if a.save:
    (ema or vae).save_pretrained(a.save)
