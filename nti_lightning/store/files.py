"""Files of a dataset run: atomic writes (temp file + rename), temp files left by a kill, per-image folders."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

HOST = socket.gethostname().replace(".", "-")
"""This machine's name as temp files and locks record it."""


def tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{HOST}-{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_image(path: Path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def remove_stale_tmp(folder: Path, owned: bool) -> None:
    """Deletes temp files a killed writer left in ``folder``: all of them where this worker owns the folder
    (an image's folder of its shard), else only those of dead processes on this host."""
    for p in folder.glob(".*.tmp"):
        if not owned:
            writer = p.name.rsplit(".", 2)[-2]  # "<host>-<pid>"
            host, _, pid = writer.rpartition("-")
            if host != HOST or not pid.isdigit() or pid_alive(int(pid)):
                continue
        p.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def item_relpath(item_id: str, subdirs: bool = False) -> str:
    """``<id>`` or, with ``output.subdirs``, ``<ab>/<id>`` where ab are the first hex digits of sha1(id)."""
    if not subdirs:
        return item_id
    return f"{hashlib.sha1(item_id.encode()).hexdigest()[:2]}/{item_id}"


def item_dir(out_dir: Path, item_id: str, subdirs: bool = False) -> Path:
    return out_dir / item_relpath(item_id, subdirs)


# ---------------------------------------------------------------------------------------------------------
# Mid-batch checkpoints (one file per worker, never fabric.save: that writes on rank 0 only and barriers)
