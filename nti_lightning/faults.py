"""Fault injection at the write points of a run, for the reliability tests (no effect unless ``NTI_FAULT`` is set).

Every place that makes a run's state durable calls ``point(name)``: an atomic file written and renamed, a
manifest line appended, the record index appended, a checkpoint saved, a claim published or taken over. The
tests set ``NTI_FAULT`` to kill the process at the n-th hit of a point exactly as ``kill -9`` would
(SIGKILL: no cleanup handler, no buffer flush), or to sleep there (to widen a race), and then check that a rerun
gives bit-identical results and valid files.

    NTI_FAULT="record.appended@3"          SIGKILL at the 3rd record appended
    NTI_FAULT="claim.takeover@1=sleep:2"   sleep 2 s before the 1st stale-claim takeover
    NTI_FAULT="file.renamed:reconstruction.png@2,checkpoint.written@1"

A point may carry a detail after ":" (``file.renamed:strip.png``); a spec without one matches every detail.
"""

from __future__ import annotations

import os
import signal
import time

_counts: dict[str, int] = {}


def _specs() -> list[tuple[str, int, str]]:
    raw = os.environ.get("NTI_FAULT", "")
    out = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        where, _, action = part.partition("=")
        name, _, nth = where.partition("@")
        out.append((name, int(nth or 1), action or "kill"))
    return out


_SPECS = _specs()


def armed(name: str) -> bool:
    """Whether a spec names this point (for writers that must tear a write half-way, e.g. ``record.partial``)."""
    return any(_matches(spec, name) for spec, _, _ in _SPECS)


def _matches(spec: str, name: str) -> bool:
    return spec == name or (":" not in spec and name.split(":", 1)[0] == spec)


def point(name: str) -> None:
    """A write point: kills or sleeps here if ``NTI_FAULT`` says so at this hit, else does nothing."""
    if not _SPECS:
        return
    for spec, nth, action in _SPECS:
        if not _matches(spec, name):
            continue
        _counts[spec] = _counts.get(spec, 0) + 1
        if _counts[spec] != nth:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))
        elif action == "oserror":
            raise OSError(28, f"No space left on device (injected at {name})")


def reload() -> None:
    """Re-reads ``NTI_FAULT`` (tests that set it in-process)."""
    global _SPECS
    _SPECS = _specs()
    _counts.clear()
