"""Files of a run: the one atomic-write helper, where each image's files go, and paths that must stay inside.

``atomic_write`` is the only way the package writes a file that a reader or a resumed run trusts: the bytes go
to a temporary file (in the worker's own temporary folder when it has one, else beside the target), are
flushed and fsynced, and the temporary file is renamed over the target, so a reader sees the old file or the
new one, never a torn one. Each step is a fault-injection point (``faults``). A worker owns its temporary
folder (``OUTPUT/.nti/tmp/<worker>/``, see ``run.folder``) and empties it when it starts: whatever a killed
writer left there is removed at once, wherever its target was.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from nti_lightning import faults
from nti_lightning.data.ids import id_component

HOST = socket.gethostname().replace(".", "-")
"""This machine's name as temporary files and claims record it."""
IMAGES_DIR = "images"
"""Per-image folders of the ``folders`` layout live under ``OUTPUT/images/``: no input name reaches a run file."""
_seq = itertools.count()


def tmp_path(path: Path, tmp_dir: Path | None = None) -> Path:
    """A temporary name for ``path``, unique to this process and call."""
    return (tmp_dir or path.parent) / f".{path.name[:100]}.{HOST}-{os.getpid()}-{next(_seq)}.tmp"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: Path,
    data: bytes | Callable[[BinaryIO], None],
    tmp_dir: Path | None = None,
    durable: bool = False,
    fault: str = "file",
) -> Path:
    """Writes ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically (module docstring).

    ``tmp_dir``: the worker's temporary folder (same file system; a cross-device rename falls back to a temporary
    file beside the target). ``durable``: also fsync the folder, so the rename itself survives a power cut
    (checkpoints, the run's identity). Fault points ``<fault>.written:<name>`` and ``<fault>.renamed:<name>``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path, tmp_dir)
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        faults.point(f"{fault}.written:{path.name}")
        try:
            os.replace(tmp, path)
        except OSError as e:
            if e.errno != errno.EXDEV or tmp_dir is None:
                raise
            return atomic_write(path, tmp.read_bytes(), None, durable, fault)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)
    faults.point(f"{fault}.renamed:{path.name}")
    return path


def atomic_write_bytes(path: Path, data: bytes, tmp_dir: Path | None = None) -> Path:
    return atomic_write(path, data, tmp_dir)


def atomic_save_image(path: Path, image, tmp_dir: Path | None = None) -> Path:
    """A PIL image as PNG, atomically."""
    return atomic_write(path, lambda f: image.save(f, format="PNG"), tmp_dir)


def clear_folder(folder: Path) -> int:
    """Empties a folder this worker owns (its temporary folder); returns how many files were removed."""
    n = 0
    for p in Path(folder).glob("*"):
        if p.is_file() or p.is_symlink():
            p.unlink(missing_ok=True)
            n += 1
    return n


def remove_stale_tmp(folder: Path) -> int:
    """Deletes temporary files that dead processes on this host left directly in ``folder`` (files written
    without a worker's temporary folder, e.g. the run's own files by an earlier version)."""
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        writer = p.name.rsplit(".", 2)[-2]  # "<host>-<pid>[-<seq>]"
        host, _, rest = writer.rpartition("-")
        if rest.isdigit() and "-" in host:  # host-pid-seq
            host, _, pid = host.rpartition("-")
        else:
            pid = rest
        if host != HOST or not pid.isdigit() or pid_alive(int(pid)):
            continue
        p.unlink(missing_ok=True)
        n += 1
    return n


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def item_relpath(item_id: str, subdirs: bool = False) -> str:
    """``images/<component>`` or, with ``output.subdirs``, ``images/<ab>/<component>`` (ab: the first hex
    digits of sha1(id)); ``<component>`` is ``ids.id_component(item_id)``, one path component."""
    comp = id_component(item_id)
    if not subdirs:
        return f"{IMAGES_DIR}/{comp}"
    return f"{IMAGES_DIR}/{hashlib.sha1(item_id.encode()).hexdigest()[:2]}/{comp}"


def item_dir(out_dir: Path, item_id: str, subdirs: bool = False) -> Path:
    return inside(out_dir, item_relpath(item_id, subdirs))


class OutsideRootError(ValueError):
    """A path that would leave the folder it must stay in."""


def inside(root: Path, rel: str | os.PathLike) -> Path:
    """``root / rel``, refused (``OutsideRootError``) if it leaves ``root`` lexically (a "..", an absolute path).
    Symlinks are the user's own layout and are followed as they are."""
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.join(base, os.fspath(rel)))
    if target != base and not target.startswith(base.rstrip(os.sep) + os.sep):
        raise OutsideRootError(f"{rel!s} is outside {root}; refused")
    return Path(root) / rel
