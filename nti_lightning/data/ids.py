"""Image ids: safe by construction, and the one path component each is stored under.

An id names an image in manifests, logs and ``nti.open_run``. It comes from input names (a file's path
relative to its folder, a list row's path, a shard's stem and member key), so it is checked before use:
``check_id`` refuses an id with an empty, "." or ".." part, a control or bidirectional-override character,
or more than ``MAX_ID_BYTES`` bytes. Such an image is recorded as failed with the reason; the run goes on.

On disk an id is never joined to a path as written: ``id_component`` turns it into **one** path component
(percent-encoding "/", "\\" and "%", so it is injective and cannot climb or nest), shortened with a hash when
it would exceed a file name's length. Per-image outputs live under ``images/`` of the output folder, a
namespace no input can reach, so an image named ``config.yaml.png`` or ``manifest.x.jsonl.png`` sits beside
no file of the run's own. ``printable`` escapes what a terminal would interpret (ANSI escapes, newlines) in
names shown in messages.
"""

from __future__ import annotations

import hashlib
import unicodedata

MAX_ID_BYTES = 1024
"""Longest id accepted (UTF-8 bytes): ids are stored in every manifest row and index."""
MAX_COMPONENT_BYTES = 200
"""Longest on-disk component before it is shortened with a hash (file systems allow 255 bytes)."""
_ENCODE = {"%": "%25", "/": "%2F", "\\": "%5C"}


class UnsafeIdError(ValueError):
    """An image id that cannot name an image safely; the message says why and what to do."""


def _bad_char(ch: str) -> bool:
    # Cc: control characters (newline, ESC of ANSI sequences, NUL); Cf: format characters such as the
    # bidirectional overrides that make a name display as another
    return unicodedata.category(ch) in ("Cc", "Cf")


def check_id(image_id: str, source: str | None = None) -> str:
    """``image_id`` unchanged if it is safe, else ``UnsafeIdError`` naming ``source`` (the file or row)."""
    where = f" (from {printable(source)})" if source else ""
    fix = "rename the file (or fix the list row) so that every part of its name is a usable file name"
    if not isinstance(image_id, str) or not image_id:
        raise UnsafeIdError(f"empty image id{where}: {fix}")
    if any(_bad_char(c) for c in image_id):
        raise UnsafeIdError(f"image id {printable(image_id)}{where} contains control characters: {fix}")
    bad = [p for p in image_id.split("/") if p in ("", ".", "..")]
    if bad:
        raise UnsafeIdError(f"image id {printable(image_id)}{where} has a part {bad[0]!r}: {fix}")
    if len(image_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise UnsafeIdError(f"image id of {len(image_id)} characters{where} is over {MAX_ID_BYTES} bytes: {fix}")
    return image_id


def id_component(image_id: str) -> str:
    """The one path component an id is stored under: "/", "\\" and "%" percent-encoded (injective), shortened to
    ``MAX_COMPONENT_BYTES`` with a hash of the whole id when longer. The id must have passed ``check_id``."""
    comp = "".join(_ENCODE.get(c, c) for c in image_id)
    raw = comp.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_COMPONENT_BYTES:
        return comp
    digest = hashlib.sha1(image_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    head = raw[: MAX_COMPONENT_BYTES - 18].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def printable(text: object) -> str:
    """``text`` for a terminal or log line: control and format characters escaped (``\\n``, ``\\x1b``, ``\\u202e``)."""
    s = str(text)
    if not any(_bad_char(c) for c in s):
        return s
    return "".join(c.encode("unicode_escape").decode("ascii") if _bad_char(c) else c for c in s)
