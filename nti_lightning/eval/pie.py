"""PIE-Bench-format data: ``mapping_file.json`` + ``annotation_images/``.

PIE-Bench (Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code", ICLR 2024) keeps
one JSON object per image id with seven keys::

    {"000000000000": {"image_path": "0_random_140/000000000000.jpg",      # relative to annotation_images/
                      "original_prompt": "a cat sitting on a wooden chair",
                      "editing_prompt": "a [dog] sitting on a wooden chair",  # [ ] around the changed words
                      "editing_instruction": "Make the cat a dog",
                      "editing_type_id": "1",                               # "0".."9", a string in PIE
                      "blended_word": "cat dog",                            # "" or "source_word target_word"
                      "mask": [start0, len0, start1, len1, ...]}}           # runs over the 512*512 row-major image

Key names, the string ``editing_type_id``, the ``blended_word`` convention and the run-length layout follow the
authors' ``run_editing_p2p.py`` / ``evaluation/evaluate.py`` (``mask_decode``). Two deliberate differences:
the authors' decoder silently clips runs that overrun 512*512; :func:`load_pie` reports them instead.
The authors' decoder also sets the one-pixel image border to 1 ("to avoid annotation errors in boundary");
that is :func:`pie_border`, applied by the evaluation, not by :func:`decode_rle`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PIE_SIZE = 512
REQUIRED_KEYS = (
    "image_path",
    "original_prompt",
    "editing_prompt",
    "editing_instruction",
    "editing_type_id",
    "blended_word",
    "mask",
)
EDITING_TYPES = {
    "0": "random",
    "1": "change object",
    "2": "add object",
    "3": "delete object",
    "4": "change attribute content",
    "5": "change attribute pose",
    "6": "change attribute color",
    "7": "change attribute material",
    "8": "change background",
    "9": "change style",
}
"""PIE-Bench's ten editing categories (Ju et al. 2024, Sec. 4 / Table 7)."""


class RleError(ValueError):
    """A run-length mask that does not decode to a 512×512 image."""


@dataclass(frozen=True)
class PieError:
    """One entry that could not be loaded: where it is, what is wrong and how to fix it."""

    entry_id: str
    file: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: entry {self.entry_id!r}: {self.problem}; fix: {self.fix}"


@dataclass(frozen=True)
class PieEntry:
    """One PIE-Bench editing task. ``mask`` is True on the edited region (512×512, row-major as in PIE), decoded
    from its checked run-length list on each access (an entry holds 512² bits only while it is used)."""

    entry_id: str
    image_file: Path
    original_prompt: str
    editing_prompt: str
    editing_instruction: str
    editing_type_id: str
    blended_word: str
    mask_rle: tuple[int, ...]

    @property
    def mask(self) -> np.ndarray:
        return decode_rle(list(self.mask_rle))

    @property
    def source_prompt(self) -> str:
        """The original prompt without ``[ ]`` (what PIE's scripts feed to the model)."""
        return strip_brackets(self.original_prompt)

    @property
    def target_prompt(self) -> str:
        """The editing prompt without ``[ ]``."""
        return strip_brackets(self.editing_prompt)

    @property
    def blended_words(self) -> tuple[str, ...]:
        """``blended_word`` split on spaces: () or (source word, target word), as PIE's P2P runner uses it."""
        return tuple(self.blended_word.split())

    def load_image(self) -> np.ndarray:
        """The image as uint8 (H, W, 3) RGB."""
        with Image.open(self.image_file) as im:
            return np.asarray(im.convert("RGB"))


def decode_rle(mask_list: list[int], size: int = PIE_SIZE) -> np.ndarray:
    """PIE's run-length mask → bool (size, size). Flat ``[start0, len0, start1, len1, ...]`` over row-major pixels.

    Raises :class:`RleError` for an odd-length list, non-integers, negative values or a run past size*size
    (the authors' ``mask_decode`` clips such runs silently; here they are reported).
    """
    values = _check_rle(mask_list, size)
    flat = np.zeros(size * size, dtype=bool)
    for start, length in zip(values[0::2], values[1::2]):
        flat[start : start + length] = True
    return flat.reshape(size, size)


def _check_rle(mask_list: object, size: int) -> list[int]:
    if not isinstance(mask_list, list):
        raise RleError(f"mask must be a list of integers, got {type(mask_list).__name__}")
    if len(mask_list) % 2:
        raise RleError(f"mask has odd length {len(mask_list)} (it must be start/length pairs)")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in mask_list):
        raise RleError("mask holds a value that is not an integer")
    if any(v < 0 for v in mask_list):
        raise RleError("mask holds a negative start or length")
    total = size * size
    for start, length in zip(mask_list[0::2], mask_list[1::2]):
        if start + length > total:
            raise RleError(f"run start={start} length={length} ends past {size}*{size}={total}")
    return mask_list


def encode_rle(mask: np.ndarray) -> list[int]:
    """Bool (H, W) mask → PIE's flat ``[start, length, ...]`` runs over row-major pixels (inverse of decode)."""
    flat = np.asarray(mask, dtype=bool).reshape(-1).astype(np.int8)
    edges = np.diff(np.concatenate(([0], flat, [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    out = np.empty(2 * len(starts), dtype=np.int64)
    out[0::2], out[1::2] = starts, ends - starts
    return [int(v) for v in out]


def pie_border(mask: np.ndarray) -> np.ndarray:
    """Mask with its one-pixel border set True, as the authors' ``mask_decode`` does before evaluation."""
    out = np.array(mask, dtype=bool, copy=True)
    out[0, :] = out[-1, :] = out[:, 0] = out[:, -1] = True
    return out


def strip_brackets(prompt: str) -> str:
    """Remove PIE's ``[`` ``]`` markers, keeping the words (``"a [red] car"`` → ``"a red car"``)."""
    return re.sub(r"\s+", " ", prompt.replace("[", "").replace("]", "")).strip()


def mask_at(mask: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a (H, W) mask to a working resolution (e.g. the 64×64 latent) by nearest sampling → bool tensor."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None]
    return F.interpolate(m, size=hw, mode="nearest-exact")[0, 0] > 0.5


def load_pie(folder: str | Path) -> tuple[list[PieEntry], list[PieError]]:
    """Load a PIE-format folder. Good entries load; each bad one gives one :class:`PieError` line."""
    root = Path(folder)
    mapping = root / "mapping_file.json"
    raw, err = _read_mapping(mapping)
    if err is not None:
        return [], [err]
    entries: list[PieEntry] = []
    errors: list[PieError] = []
    for entry_id, item in raw.items():
        result = _parse_entry(str(entry_id), item, root, str(mapping))
        (errors if isinstance(result, PieError) else entries).append(result)
    return entries, errors


def _read_mapping(mapping: Path) -> tuple[dict, PieError | None]:
    if not mapping.is_file():
        return {}, PieError("*", str(mapping), "file not found", "point at a folder holding mapping_file.json")
    try:
        raw = json.loads(mapping.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return {}, PieError("*", str(mapping), f"not valid JSON ({exc})", "repair or regenerate the file")
    if not isinstance(raw, dict):
        return {}, PieError("*", str(mapping), "top level is not an object", "use {id: {...}, ...}")
    return raw, None


def _parse_entry(entry_id: str, item: object, root: Path, file: str) -> PieEntry | PieError:
    def bad(problem: str, fix: str) -> PieError:
        return PieError(entry_id, file, problem, fix)

    if not isinstance(item, dict):
        return bad("entry is not an object", "make it an object with the seven PIE keys")
    missing = [k for k in REQUIRED_KEYS if k not in item]
    if missing:
        return bad(f"missing key(s) {', '.join(missing)}", f"add them; PIE entries have {', '.join(REQUIRED_KEYS)}")
    unknown = sorted(set(item) - set(REQUIRED_KEYS))
    if unknown:
        return bad(f"unknown key(s) {', '.join(unknown)}", "remove them or check their spelling")
    text_keys = [k for k in REQUIRED_KEYS if k not in ("mask", "editing_type_id") and not isinstance(item[k], str)]
    if text_keys:
        return bad(f"{', '.join(text_keys)} must be strings", "quote the values")
    type_id = str(item["editing_type_id"])
    if type_id not in EDITING_TYPES:
        return bad(f"editing_type_id {item['editing_type_id']!r} is not 0-9", 'use "0" .. "9" as in PIE-Bench')
    image_file = root / "annotation_images" / item["image_path"]
    if not image_file.is_file():
        return bad(f"image {image_file} not found", "fix image_path (relative to annotation_images/)")
    try:
        _check_rle(item["mask"], PIE_SIZE)
    except RleError as exc:
        return bad(f"mask does not decode to {PIE_SIZE}x{PIE_SIZE}: {exc}", "re-encode it with encode_rle(mask)")
    return PieEntry(
        entry_id=entry_id,
        image_file=image_file,
        original_prompt=item["original_prompt"],
        editing_prompt=item["editing_prompt"],
        editing_instruction=item["editing_instruction"],
        editing_type_id=type_id,
        blended_word=item["blended_word"],
        mask_rle=tuple(item["mask"]),
    )
