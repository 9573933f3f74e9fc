"""One (image, method) pair of ``nti eval`` once its inversion is finished: reconstruct, edit, measure, write.

The edit (Ju et al. 2024, ``run_editing_p2p.py``): source and target prompt without ``[ ]``, w = 7.5,
cross-attention injected for the first 40% of the steps and self-attention for 60%; word swap ("replace") when
the prompts have as many words (P2P's rule: a multi-token word maps as a whole), else "refine"; ``blended_word``
"src tgt" → local blend on both words and the target word's attention ×2. Seconds and UNet calls per image count
the inversion and the edit (not the reconstruction, which is this evaluation's, not the method's). Every network
call goes through the worker's ``Runtime`` (its device and precision).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from PIL import Image

from nti_lightning.api import reconstruction_latents
from nti_lightning.data.image import prepare_image, tensor_to_image
from nti_lightning.engine.ddim import schedule_from_scheduler
from nti_lightning.engine.sampling import ddim_sample, decode_latents
from nti_lightning.engine.step_guidance import record_guidance
from nti_lightning.eval import report
from nti_lightning.eval.config import PieEditConfig
from nti_lightning.eval.metrics import Nets, lpips, pie_metrics, psnr, ssim
from nti_lightning.eval.pie import PieEntry, mask_at, pie_border
from nti_lightning.p2p.alignment import AlignmentError, WordNotInPromptError
from nti_lightning.p2p.edit import EditSpec, edit_batch
from nti_lightning.store.files import atomic_save_image, inside, item_relpath


def entry_fingerprint(entry: PieEntry) -> str:
    """What a pair's result depends on in its entry (image, prompts, words, mask): a changed entry is redone."""
    mask = hashlib.sha1(json.dumps(entry.mask_rle).encode()).hexdigest()
    return json.dumps([str(entry.image_file), entry.original_prompt, entry.editing_prompt, entry.blended_word, mask])


def decode_entry(entry: PieEntry, size: int) -> torch.Tensor:
    """The entry's image, (3, size, size) in [-1, 1]."""
    return prepare_image(entry.image_file, size, name=str(entry.image_file))


def edit_spec(entry: PieEntry, cfg: PieEditConfig, plain: bool = False) -> EditSpec:
    """PIE-Bench's P2P edit of ``entry``; ``plain``: refine without local blend or re-weighting (the fallback
    when the entry's words cannot be found or aligned)."""
    words = entry.blended_words if len(entry.blended_words) == 2 and not plain else ()
    return EditSpec(
        entry.target_prompt,
        mode=None if not plain else "refine",  # None: P2P's rule, replace when the prompts align word for word
        cross_replace_steps=cfg.cross_replace_steps,
        self_replace_steps=cfg.self_replace_steps,
        blend_words=list(words) or None,
        reweight={words[1]: cfg.blend_reweight} if words else None,
    )


def run_edit(model, inv, entry: PieEntry, cfg: PieEditConfig, runtime, log) -> tuple[torch.Tensor, str, str | None]:
    """The P2P edit → (latents [source, target], mode, fallback reason). If the entry's words do not fit the
    prompts: refine without local blend; if even that cannot align them (a deletion: the target lacks source
    words), the target prompt sampled from the record without attention control (mode "none")."""
    try:
        result = edit_batch(model, inv, [edit_spec(entry, cfg)], runtime=runtime)
        return result.latents, result.modes[0], None
    except (AlignmentError, WordNotInPromptError) as e:
        reason = str(e)
    try:
        result = edit_batch(model, inv, [edit_spec(entry, cfg, plain=True)], runtime=runtime)
        log(f"{entry.entry_id}: {reason}; edited with refine, no local blend")
        return result.latents, result.modes[0], reason
    except AlignmentError:
        log(f"{entry.entry_id}: {reason}; no P2P alignment: the target prompt sampled without attention control")
        return uncontrolled_edit(model, inv, entry.target_prompt, runtime), "none", reason


def uncontrolled_edit(model, inv, target: str, runtime) -> torch.Tensor:
    """[source, target] sampled from the record with its nulls and step guidance, no attention control."""
    schedule = schedule_from_scheduler(model.scheduler, inv.num_steps)
    z_T = inv.z_T[None].expand(2, -1, -1, -1).to(model.device)
    cond = inv.sized_family(model).encode_prompts(model, [inv.prompt, target])
    nulls = [{k: v.expand(2, *v.shape[1:]) for k, v in null.items()} for null in inv.nulls(model)]
    w = inv.meta["hyperparameters"]["guidance_scale"]
    denoise = runtime.denoiser(model.unet, model.family)
    return ddim_sample(denoise, schedule, z_T, cond, nulls, w, None, record_guidance([inv], 2, edit=True)).cpu()


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) in [-1, 1] → (1, 3, H, W) in [0, 1]."""
    return ((pixels.float().cpu() + 1) / 2).clamp(0, 1).reshape(1, *pixels.shape[-3:])


def measure(source: torch.Tensor, recon: torch.Tensor, edited: torch.Tensor, entry: PieEntry, nets: Nets) -> dict:
    """Reconstruction PSNR/SSIM/LPIPS against the source; PIE-Bench's Table 1 metrics of the edit."""
    out = {"psnr_rec": float(psnr(recon, source)[0]), "ssim_rec": float(ssim(recon, source)[0])}
    if nets.lpips is not None:
        out["lpips_rec"] = float(lpips(recon, source, nets.lpips)[0])
    mask = mask_at(pie_border(entry.mask), tuple(source.shape[-2:])).numpy()
    out.update(pie_metrics(source, edited, mask, entry.target_prompt, nets))
    return out


def evaluate_pair(job, entry: PieEntry, method: str, inv, pixels: torch.Tensor, seconds_invert: float) -> dict:
    """A finished inversion → its record's fields (measurements, cost, the pictures' ``paths``), the pictures
    written first. ``job``: the worker (its model, runtime, settings, nets, output folder, temporary folder)."""
    model, runtime, cfg = job.model, job.runtime, job.cfg
    recon = to_unit(decode_latents(model, reconstruction_latents(model, [inv], runtime=runtime))[0])
    t0 = time.perf_counter()
    latents, mode, fallback = run_edit(model, inv, entry, cfg.edit, runtime, job.note)
    seconds_edit = time.perf_counter() - t0
    edited = to_unit(decode_latents(model, latents[1:2].to(model.device))[0])
    rec = {"editing_type_id": entry.editing_type_id}
    rec.update(measure(to_unit(pixels), recon, edited, entry, job.nets))
    calls_invert = int(sum(inv.meta["unet_calls"].values()))
    calls_edit = inv.num_steps * 2 * 2  # T steps × [source, target] × [∅, C]
    rec.update(
        mode=mode, seconds=seconds_invert + seconds_edit, seconds_invert=seconds_invert,
        seconds_edit=seconds_edit, unet_calls=calls_invert + calls_edit, unet_calls_invert=calls_invert,
    )  # fmt: skip
    if fallback is not None:
        rec["edit_fallback"] = fallback
    rel = item_relpath(entry.entry_id)
    folder = inside(job.out, rel)
    atomic_save_image(folder / f"{method}_recon.png", tensor_to_image(recon[0] * 2 - 1), job.folder.tmp)
    atomic_save_image(folder / f"{method}_edit.png", tensor_to_image(edited[0] * 2 - 1), job.folder.tmp)
    rec["paths"] = {"recon": f"{rel}/{method}_recon.png", "edit": f"{rel}/{method}_edit.png"}
    return rec


def write_strip(out: Path, entry: PieEntry, methods: list[str], size: int, tmp_dir: Path) -> Path:
    """strips/<id component>.png: the source, then each method's reconstruction and edit (read back from
    images/<id component>/)."""
    rel = item_relpath(entry.entry_id)
    pairs = {}
    for m in methods:
        with Image.open(inside(out, rel) / f"{m}_recon.png") as r, Image.open(inside(out, rel) / f"{m}_edit.png") as e:
            pairs[m] = (r.convert("RGB"), e.convert("RGB"))
    source = tensor_to_image(decode_entry(entry, size))
    path = inside(out, f"strips/{rel.split('/', 1)[1]}.png")
    report.image_strip(source, pairs, path, size=max(source.width, 128), tmp_dir=tmp_dir)
    return path
