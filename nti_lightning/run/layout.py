"""Which output layout a run writes (``output.layout``), decided once per folder.

"folders" and "shards" are taken as given. "auto" is decided by the first worker that has images to write, and
kept in ``.nti/layout.json`` so that every worker of the run, and every rerun, writes the same layout:

1. a folder that already holds outputs keeps their layout (a run from before the ``shards`` layout stays
   ``folders``);
2. else "shards" when the dataset holds more than ``AUTO_SHARDS_ABOVE`` images — counted for plain inputs
   (every worker walks their names), estimated for input shards as the deciding worker's mean shard size times
   the number of input shards (a worker opens only its own shards) — else "folders".

At 10^4 images the folders layout is 4·10^4 files in 10^4 folders, which a laptop or a workstation disk takes
well and which is easy to browse; beyond it, cluster file systems' file-count quotas are what runs hit first.
The record of the decision is published whole (written, then hard-linked into place: the first worker wins,
the others read its decision), so two array tasks starting together cannot decide differently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

AUTO_SHARDS_ABOVE = 10_000
"""``output.layout=auto`` writes shards above this many images in the dataset."""
LAYOUT_FILE = ".nti/layout.json"


def existing_layout(out_dir: Path) -> str | None:
    """The layout a folder's outputs are in: "shards" with output shards in ``shards/``, "folders" with
    ``images/`` or manifests (a run from before the layouts), None for a new folder."""
    out = Path(out_dir)
    if any((out / "shards").glob("*.tar")) or any((out / "shards").glob("*.tar.part")):
        return "shards"
    if (out / "images").is_dir() or any(out.glob("manifest*.jsonl")):
        return "folders"
    return None


def choose_layout(setting: str, out_dir: Path, estimate: int, tmp_dir: Path) -> tuple[str, str]:
    """(layout, why) for this worker (module docstring); ``estimate``: the dataset's size as this worker
    sees it. Publishes an "auto" decision."""
    if setting != "auto":
        return setting, f"output.layout={setting}"
    path = Path(out_dir) / LAYOUT_FILE
    decided = _read(path)
    if decided is not None:
        return decided["layout"], decided["why"]
    had = existing_layout(out_dir)
    if had is not None:
        layout, why = had, f"output.layout=auto: the folder's outputs are in the {had} layout"
    else:
        layout = "shards" if estimate > AUTO_SHARDS_ABOVE else "folders"
        rel = ">" if layout == "shards" else "<="
        why = f"output.layout=auto: about {estimate} images {rel} {AUTO_SHARDS_ABOVE}"
    won = _publish(path, {"layout": layout, "why": why, "estimate": estimate}, tmp_dir)
    return (layout, why) if won is None else (won["layout"], won["why"])


def _read(path: Path) -> dict | None:
    try:
        decided = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return decided if decided.get("layout") in ("folders", "shards") else None


def _publish(path: Path, decision: dict, tmp_dir: Path) -> dict | None:
    """Links the decision into place; None if it is ours, else the decision another worker published first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"layout.{os.getpid()}.json"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(decision, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return None
    except FileExistsError:
        return _read(path) or decision
    finally:
        tmp.unlink(missing_ok=True)
