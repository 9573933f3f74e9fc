"""PIE-Bench metrics (Ju et al., "PnP Inversion", ICLR 2024, Table 1) as small functions on (B, 3, H, W) in [0, 1].

Conventions follow the authors' ``evaluation/matrics_calculator.py``:

* per image (their batch is one image); ``keep`` masks multiply **both** images and the metric is then taken
  over the whole frame (so the zeroed region counts as perfect agreement), e.g. background PSNR is
  ``psnr(edit * (1 - mask), source * (1 - mask))``; an empty ``keep`` gives NaN (their ``"nan"``);
* PSNR with data range 1, MSE over all values, SSIM = torchmetrics' gaussian SSIM (σ = 1.5, 11×11), LPIPS with
  the SqueezeNet backbone on [-1, 1] inputs, CLIP score = 100·max(cos(image, text), 0) (torchmetrics CLIPScore),
  structure distance = MSE between DINO ViT key self-similarities of the last layer (Tumanyan et al., "Splicing
  ViT Features for Semantic Appearance Transfer", CVPR 2022), images resized to 224 and ImageNet-normalised.

Networks come only from local paths (:class:`Backbones`); a metric whose path is None is skipped with one log line.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from nti_lightning.metrics import psnr_per_image

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _keep(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """(H, W), (B, H, W) or (B, 1, H, W) mask → float (B, 1, H, W) on ``like``'s device."""
    if mask is None:
        return None
    m = torch.as_tensor(mask, device=like.device).to(like.dtype)
    while m.dim() < 4:
        m = m.unsqueeze(0) if m.dim() < 3 else m.unsqueeze(1)
    return m.expand(like.shape[0], 1, *like.shape[2:])


def _apply(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None):
    """Both images times ``keep`` (PIE's masked metrics) and a (B,) bool 'region is empty'."""
    k = _keep(keep, pred)
    if k is None:
        return pred, target, torch.zeros(pred.shape[0], dtype=torch.bool, device=pred.device)
    return pred * k, target * k, k.flatten(1).sum(1) == 0


def _nan_where(values: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    return torch.where(empty, torch.full_like(values, math.nan), values)


def mse(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per image, (B,). With ``keep``: on ``pred*keep`` vs ``target*keep`` (PIE)."""
    p, t, empty = _apply(pred.float(), target.float(), keep)
    return _nan_where((p - t).pow(2).flatten(1).mean(1), empty)


def psnr(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB per image (data range 1; ``metrics.psnr_per_image``, torchmetrics), (B,); identical images give
    +inf. With ``keep``: on ``pred*keep`` vs ``target*keep`` (PIE)."""
    p, t, empty = _apply(pred.float(), target.float(), keep)
    return _nan_where(psnr_per_image(p, t), empty)


def ssim(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """SSIM per image (Wang et al. 2004; torchmetrics' gaussian window, data range 1), (B,)."""
    p, t, empty = _apply(pred.float(), target.float(), keep)
    values = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none")
    return _nan_where(values.reshape(-1), empty)


@dataclass(frozen=True)
class Backbones:
    """Local paths of the metric networks; None skips the metric. Nothing is ever downloaded.

    ``lpips``: a torchvision state dict of the LPIPS backbone as torch hub saves it (``squeezenet1_1`` for PIE-Bench,
    i.e. torch hub's ``squeezenet1_1-b8a52dc0.pth``); the LPIPS linear heads ship with torchmetrics.
    ``dino``: a transformers folder of a DINO ViT (PIE-Bench: ``dino_vitb8``) as ``ViTModel`` or ``Dinov2Model``.
    ``clip``: a transformers ``CLIPModel`` folder with its tokenizer (PIE-Bench: ``clip-vit-large-patch14``).
    """

    lpips: Path | None = None
    dino: Path | None = None
    clip: Path | None = None
    lpips_net: str = "squeeze"


TORCHVISION_WEIGHTS = {"squeeze": "SqueezeNet1_1_Weights", "alex": "AlexNet_Weights", "vgg": "VGG16_Weights"}
"""LPIPS backbone → the torchvision weights enum whose file torchmetrics' LPIPS loads (through torch hub's cache)."""


@contextlib.contextmanager
def hub_cache_holding(data: bytes, file_name: str):
    """torch hub's cache pointed, for the block, at a temporary folder holding ``data`` as ``checkpoints/file_name``:
    torchvision's pretrained builders then read that file instead of downloading theirs (``load_state_dict_from_url``
    uses a cached file of the URL's name when there is one)."""
    before = torch.hub.get_dir()
    with tempfile.TemporaryDirectory(prefix="nti-hub-") as folder:
        (Path(folder) / "checkpoints").mkdir()
        (Path(folder) / "checkpoints" / file_name).write_bytes(data)
        torch.hub.set_dir(folder)
        try:
            yield
        finally:
            torch.hub.set_dir(before)


def load_lpips(backbones: Backbones):
    """torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` (per image, [0, 1] inputs) with its backbone read from
    ``backbones.lpips``, never downloaded; None (one log line) if unavailable.

    The public class only builds a pretrained torchvision backbone, which torchvision fetches through torch hub's
    cache: the local file, first checked to hold nothing but tensors (``torch.load(weights_only=True)``: torch
    hub would unpickle it in full), is put in a temporary cache under torchvision's own file name."""
    if backbones.lpips is None:
        net = backbones.lpips_net
        log.info("LPIPS skipped: no local backbone (nti eval --lpips PATH: a torchvision %s state dict)", net)
        return None
    try:
        import torchvision
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    except ImportError as exc:
        log.info("LPIPS skipped: torchmetrics' LPIPS needs torchvision (%s)", exc)
        return None
    net, path = backbones.lpips_net, Path(backbones.lpips)
    bad = f"{path}: not a torchvision {net} state dict as torch hub saves it (keys features.N.*, classifier.*)"
    data = path.read_bytes()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any unpickling failure: refused, nothing of it was run
        raise ValueError(f"{bad}; refused: {str(exc).strip().splitlines()[0]}") from exc
    weights = getattr(torchvision.models, TORCHVISION_WEIGHTS[net]).DEFAULT
    with hub_cache_holding(data, Path(urlparse(weights.url).path).name):
        try:
            metric = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=True)
        except (RuntimeError, KeyError, TypeError) as exc:  # load_state_dict of other keys or shapes
            raise ValueError(bad) from exc
    return metric.eval()


def lpips(pred: torch.Tensor, target: torch.Tensor, net, keep: torch.Tensor | None = None):
    """LPIPS per image (Zhang et al., CVPR 2018) on [0, 1] images, fed to the network as [-1, 1] as PIE-Bench, (B,)."""
    p, t, empty = _apply(pred.float(), target.float(), keep)
    net.reset()
    with torch.no_grad():
        net.update(p.clamp(0, 1), t.clamp(0, 1))
        values = net.compute().reshape(-1)
    net.reset()
    return _nan_where(values, empty)


def load_dino(backbones: Backbones) -> torch.nn.Module | None:
    """A DINO ViT from ``backbones.dino`` (transformers ``AutoModel``, local files only); None with one log line."""
    if backbones.dino is None:
        log.info("Structure distance skipped: no local DINO ViT (nti eval --dino PATH: a ViTModel folder)")
        return None
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(backbones.dino), local_files_only=True).eval()


def _last_key_projection(model: torch.nn.Module) -> torch.nn.Module:
    names = [(n, m) for n, m in model.named_modules() if n.endswith((".key", ".k_proj"))]
    if not names:
        raise ValueError(f"{type(model).__name__}: no attention key projection (.key / .k_proj) found")
    return names[-1][1]


def dino_key_self_similarity(
    images: torch.Tensor, model: torch.nn.Module, size: int = 224, pixel_range: float = 255.0
) -> torch.Tensor:
    """Cosine self-similarity (B, T, T) of the last layer's keys, heads concatenated (Tumanyan et al. 2022).

    ``pixel_range`` scales [0, 1] images before ImageNet normalisation: 255 reproduces PIE-Bench's evaluation code,
    which feeds 0-255 arrays to the DINO transform; 1.0 is the scale of Tumanyan et al.
    """
    x = F.interpolate(images.float() * pixel_range, size=(size, size), mode="bilinear", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    keys: list[torch.Tensor] = []
    handle = _last_key_projection(model).register_forward_hook(lambda _m, _i, out: keys.append(out))
    try:
        with torch.no_grad():
            kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in _forward_args(model) else {}
            model(pixel_values=((x - mean) / std).to(next(model.parameters()).dtype), **kwargs)
    finally:
        handle.remove()
    k = F.normalize(keys[-1].float(), dim=-1, eps=1e-8)
    return k @ k.transpose(1, 2)


def _forward_args(model: torch.nn.Module) -> tuple[str, ...]:
    return tuple(inspect.signature(model.forward).parameters)


def structure_distance(source: torch.Tensor, edited: torch.Tensor, model: torch.nn.Module, **kw) -> torch.Tensor:
    """MSE between the DINO key self-similarities of source and edit, per image (B,) (PIE-Bench's Structure)."""
    a, b = dino_key_self_similarity(source, model, **kw), dino_key_self_similarity(edited, model, **kw)
    return (a - b).pow(2).flatten(1).mean(1)


@dataclass
class Clip:
    """A local CLIP model, its tokenizer and image processor (CLIP's resize/crop/normalise)."""

    model: torch.nn.Module
    tokenizer: object
    processor: object


def load_clip(backbones: Backbones) -> Clip | None:
    """CLIPModel + tokenizer (+ image processor, defaulting to CLIP's) from ``backbones.clip``; None with one line."""
    if backbones.clip is None:
        log.info("CLIP similarity skipped: no local CLIP (nti eval --clip PATH: a CLIPModel folder)")
        return None
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    path = str(backbones.clip)
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    size = model.config.vision_config.image_size
    try:
        processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    except OSError:
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return Clip(model, AutoTokenizer.from_pretrained(path, local_files_only=True), processor)


def clip_image_features(images: torch.Tensor, clip: Clip, keep: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised CLIP image embeddings (B, D); with ``keep``, of ``images * keep`` (PIE's edited region)."""
    k = _keep(keep, images)
    x = images.float() if k is None else images.float() * k
    u8 = [(im.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy() for im in x]
    pixels = clip.processor(images=u8, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = clip.model.vision_model(pixel_values=pixels.to(next(clip.model.parameters()).device)).pooler_output
        return F.normalize(clip.model.visual_projection(pooled).float(), dim=-1)


def clip_text_features(texts: list[str], clip: Clip) -> torch.Tensor:
    """L2-normalised CLIP text embeddings (B, D)."""
    ids = clip.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    device = next(clip.model.parameters()).device
    with torch.no_grad():
        out = clip.model.text_model(
            input_ids=ids["input_ids"].to(device), attention_mask=ids["attention_mask"].to(device)
        )
        return F.normalize(clip.model.text_projection(out.pooler_output).float(), dim=-1)


def clip_score(images: torch.Tensor, texts: list[str], clip: Clip, keep: torch.Tensor | None = None) -> torch.Tensor:
    """100·max(cos(image, text), 0) per image (Hessel et al. 2021 CLIPScore as torchmetrics; PIE's CLIP metric).

    Not torchmetrics' ``CLIPScore`` itself (PIE-Bench's code calls it): torchmetrics 1.9's takes ``get_image_features``'
    output for a tensor, and transformers 5 returns a ``BaseModelOutputWithPooling`` (tests/eval/test_clip_score_pin.py
    pins that, and that CLIPScore given the tensors gives these numbers)."""
    cos = (clip_image_features(images, clip, keep) * clip_text_features(texts, clip)).sum(-1)
    return 100 * cos.clamp(min=0)


def clip_image_similarity(a: torch.Tensor, b: torch.Tensor, clip: Clip) -> torch.Tensor:
    """Cosine between CLIP image embeddings of ``a`` and ``b`` per image (B,); 1 for identical images."""
    return (clip_image_features(a, clip) * clip_image_features(b, clip)).sum(-1)


@dataclass
class Nets:
    """The loaded metric networks; a None entry means its metrics are skipped (reported as missing)."""

    lpips: torch.nn.Module | None = None
    dino: torch.nn.Module | None = None
    clip: Clip | None = None


def load_nets(backbones: Backbones) -> Nets:
    """Load every network that has a local path; each missing one logs one line."""
    return Nets(load_lpips(backbones), load_dino(backbones), load_clip(backbones))


def pie_metrics(
    source: torch.Tensor, edited: torch.Tensor, edit_mask: np.ndarray | torch.Tensor, target_prompt: str, nets: Nets
) -> dict[str, float]:
    """PIE-Bench Table 1 metrics of one edit (1, 3, H, W): structure, background (unedited region) PSNR / LPIPS /
    MSE / SSIM and CLIP score of the whole edit and of its edited region. ``edit_mask`` is True where edited;
    pass it through :func:`nti_lightning.eval.pie.pie_border` first to match the authors' evaluation exactly.
    """
    m = torch.as_tensor(np.asarray(edit_mask), dtype=torch.float32, device=source.device)
    bg = 1 - m
    out = {
        "psnr_bg": float(psnr(edited, source, bg)[0]),
        "mse_bg": float(mse(edited, source, bg)[0]),
        "ssim_bg": float(ssim(edited, source, bg)[0]),
    }
    if nets.lpips is not None:
        out["lpips_bg"] = float(lpips(edited, source, nets.lpips, bg)[0])
    if nets.dino is not None:
        out["structure_distance"] = float(structure_distance(source, edited, nets.dino)[0])
    if nets.clip is not None:
        out["clip_whole"] = float(clip_score(edited, [target_prompt], nets.clip)[0])
        edited_region = float("nan") if m.sum() == 0 else float(clip_score(edited, [target_prompt], nets.clip, m)[0])
        out["clip_edited"] = edited_region
    return out
