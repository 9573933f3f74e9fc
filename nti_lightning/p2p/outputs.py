"""The files of one edit, and the naming rule that keeps every earlier edit intact.

An edit named ``<stem>`` owns four files in its folder: ``<stem>.png`` (the edit), ``<stem>_strip.png``
(source | reconstruction | edit, labelled), ``<stem>_attention.png`` (only with ``attention``) and
``<stem>.json`` (its resolved ``EditConfig`` and where it came from). The rule: a stem is free only when none
of the four exists. A new edit whose stem is taken gets ``<stem>-2``, ``<stem>-3``, … (a slug never contains
"-"), so it neither overwrites an earlier edit nor sits beside an older attention map that looks like its
own; with ``overwrite`` the earlier edit's four files are all removed first. The ``.json`` is created
exclusively before the pictures are written, so two processes cannot claim one name.

That rule is for edits made one at a time (``nti edit FILE --target``). The batch form names each line's edit
itself (its line number and target: the same names on every rerun) and writes it with ``write_edit``, which
replaces that edit's files and removes an attention map the new edit does not have.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

from PIL import Image

from nti_lightning.edit_config import EditConfig
from nti_lightning.p2p.edit import EditResult, EditSpec
from nti_lightning.p2p.figures import edit_strip
from nti_lightning.store.files import atomic_save_image, atomic_write
from nti_lightning.store.inversion import Inversion


def slug(text: str, limit: int = 48) -> str:
    """A file-name stem from a prompt: lower-case letters, digits and "_"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "edit"


def edit_files(folder: Path, stem: str) -> dict[str, Path]:
    """The four files an edit named ``stem`` owns."""
    return {
        "edit": folder / f"{stem}.png",
        "strip": folder / f"{stem}_strip.png",
        "attention": folder / f"{stem}_attention.png",
        "settings": folder / f"{stem}.json",
    }


def claim_stem(folder: Path, stem: str, overwrite: bool = False) -> str:
    """The stem the new edit is written under (see the module docstring); its ``.json`` now exists, empty."""
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in edit_files(folder, stem).values():
            path.unlink(missing_ok=True)
    n, candidate = 1, stem
    while True:
        files = edit_files(folder, candidate)
        if not any(p.exists() for p in files.values()):
            try:
                os.close(os.open(files["settings"], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return candidate
            except FileExistsError:  # another process claimed it just now
                pass
        n += 1
        candidate = f"{stem}-{n}"


def settings_record(
    inversion_path, inversion: Inversion, model, spec: EditSpec, config: EditConfig, result: EditResult, k: int
) -> dict:
    """Everything that made edit k: the inversion (a file's absolute path, or where a recorded image's record is),
    the model, the prompts and the resolved ``EditConfig`` (the mode as inferred, the guidance scale as used)."""
    resolved = replace(config, mode=result.modes[k - 1], guidance_scale=result.guidance_scale)
    return {
        "inversion": str(Path(inversion_path).resolve()) if isinstance(inversion_path, Path) else str(inversion_path),
        "model": model.source,
        "model_fingerprint": model.fingerprint,
        "source_prompt": inversion.prompt,
        "target": spec.target,
        "blend": list(spec.blend_words) if spec.blend_words else None,
        "reweight": spec.reweight,
        "config": resolved.to_dict(),
    }


def save_edit(
    folder: Path, stem: str, result: EditResult, k: int, source: Image.Image, record: dict, config: EditConfig
) -> dict[str, Path]:
    """Writes edit k of ``result`` under a free stem (``claim_stem``): the edit, its labelled strip, its
    attention figure where asked for and recorded, and the settings ``record``. Returns the paths written."""
    stem = claim_stem(folder, stem, config.overwrite)
    return write_edit(edit_files(folder, stem), result, k, source, record, config.attention)


def write_edit(
    files: dict[str, Path],
    result: EditResult,
    k: int,
    source: Image.Image,
    record: dict,
    attention: bool,
    tmp_dir: Path | None = None,
) -> dict[str, Path]:
    """Edit k of ``result`` into ``files`` (``edit_files``), each atomically (``tmp_dir``: the worker's temporary
    folder), the settings last; an attention map not asked for or not recorded is removed, so none of another
    edit stays beside this one. Returns the paths written."""
    files = dict(files)
    atomic_save_image(files["edit"], result.images[k], tmp_dir)
    atomic_save_image(files["strip"], edit_strip(source, result, k), tmp_dir)
    if not (attention and result.attention is not None):
        files.pop("attention").unlink(missing_ok=True)
    else:
        atomic_save_image(files["attention"], result.attention_image(k), tmp_dir)
    record = {**record, "files": {name: p.name for name, p in files.items()}}
    atomic_write(files["settings"], (json.dumps(record, indent=2) + "\n").encode(), tmp_dir)
    return files
