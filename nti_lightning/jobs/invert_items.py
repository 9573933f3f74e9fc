"""What ``nti invert`` checks and reads before and around its loop: inputs, the run's identity, the item stream.

* ``check_inputs`` — every input path exists, the captions file too, the output is not a file: before anything
  is loaded or written.
* ``run_identity`` — what must not change between runs writing into one folder (``run.json``); without a model
  it is the part a rerun can compare before spending the model load (``PRE_LOAD_UNKNOWN`` is what only the
  loaded model tells).
* ``decode`` / ``prefetched`` / ``pixel_hash`` — an item's pixels, decoded ahead in a thread, and the hash a
  resumed run checks them against.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from nti_lightning.config import RunConfig
from nti_lightning.data.image import ImageError, prepare_image
from nti_lightning.data.items import SAMPLES_DIR, Item
from nti_lightning.data.shards import is_shard_pattern, read_sample

# settings that change how fast a run goes, not what it computes (batch_invariant: bits, not results)
NOT_IDENTITY = ("batch_size", "slots", "batch_invariant")
# fields added after folders were made: left out of the identity while at their defaults, so those folders still
# match (a run with another method, or proximal settings of proxnpi, is a different run)
LATER_FIELDS = ("method", "prox_operator", "prox_quantile", "prox_recon_t", "prox_recon_lr", "prox_dilate")
PRE_LOAD_UNKNOWN = ("model_fingerprint", "image_size", "inversion.image_size")
"""Identity keys only the loaded model can tell: compared after the load."""


def resolve_inputs(cfg: RunConfig) -> tuple[list[str], str | None]:
    """The run's inputs and captions file; none given: the bundled sample photos and their captions."""
    if cfg.data.images:
        return list(cfg.data.images), cfg.data.captions
    return [str(SAMPLES_DIR)], cfg.data.captions or str(SAMPLES_DIR / "captions.jsonl")


def check_inputs(cfg: RunConfig) -> tuple[list[str], str | None]:
    """``resolve_inputs`` checked: a missing input or captions file, or an output that is a file, is an error
    naming it — raised before the folder is touched."""
    images, captions = resolve_inputs(cfg)
    for path in images:
        if not os.path.exists(path) and not is_shard_pattern(path):  # a pattern's shards: list_shards checks them
            raise FileNotFoundError(f"input {path} does not exist; fix --images (or data.images)")
    if captions is not None and not Path(captions).is_file():
        raise FileNotFoundError(f"captions file {captions} does not exist; fix --captions (or data.captions)")
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output folder {out} is a file; give a folder (--output / output.dir)")
    return images, captions


def run_identity(cfg: RunConfig, model=None) -> dict:
    """What must not change between runs writing into one folder; ``model`` None: the part known before the
    load (the source from the spec, no fingerprint, the image size as configured)."""
    from nti_lightning.models.loading import model_source, resolve_config_dir

    defaults = asdict(type(cfg.inversion)())
    inversion = {
        k: v
        for k, v in asdict(cfg.inversion).items()
        if k not in NOT_IDENTITY and not (k in LATER_FIELDS and v == defaults[k])
    }
    size = (cfg.inversion.image_size or model.native_image_size) if model is not None else cfg.inversion.image_size
    inversion["image_size"] = size  # null and the size it resolves to are one
    if model is not None:
        source, config_dir = model.source, model.config_dir
    else:
        source = model_source(cfg.model.spec)
        single = Path(str(cfg.model.spec)).suffix in (".safetensors", ".ckpt")
        config_dir = resolve_config_dir(cfg.model.config_dir)[1] if single else None
    return {
        "model_fingerprint": model.fingerprint if model is not None else None,
        "model_source": source,
        # a single-file checkpoint's config folder sets its scheduler and prediction type; only present then
        **({"model_config_dir": config_dir} if config_dir else {}),
        "inversion": inversion,
        "image_size": size,
        "precision": cfg.trainer.precision,
    }


def pixel_hash(pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def decode(item: Item, size: int) -> torch.Tensor | Exception:
    """The item's pixels (3, size, size) in [-1, 1], or the error that names the file and the fix."""
    try:
        if item.error:
            raise ValueError(item.error)
        if item.key is not None:  # a shard sample: its bytes, read with it or (restored from a checkpoint) again
            data = item.data if item.data is not None else read_sample(item)
            return prepare_image(data, size, name=item.label)
        if item.where is not None and not os.path.isfile(item.path):
            raise ImageError(
                f"{item.where}: image {item.path} not found; fix the path (relative paths are relative to the "
                "list file's folder) or remove the row"
            )
        return prepare_image(item.path, size, name=item.label)
    except (ImageError, ValueError, OSError) as e:
        return e


def prefetched(
    items: Iterator[tuple[int, Item]], load: Callable[[Item], object], lookahead: int
) -> Iterator[tuple[int, Item, object]]:
    """``(k, item, load(item))`` in order, with up to ``lookahead`` items loaded ahead in a background thread."""
    if lookahead == 0:
        yield from ((k, it, load(it)) for k, it in items)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nti-decode") as pool:
        queue: deque = deque()
        for k, it in items:
            queue.append((k, it, pool.submit(load, it)))
            if len(queue) > lookahead:
                k0, head, fut = queue.popleft()
                yield k0, head, fut.result()
        while queue:
            k0, head, fut = queue.popleft()
            yield k0, head, fut.result()
