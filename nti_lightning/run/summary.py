"""A worker's counts, kept small whatever the dataset size, and merged across the ranks one process launched."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nti_lightning.store.files import atomic_write

SUMMARY_ROWS = 1000


@dataclass
class RunSummary:
    """This process's counts; ``done``/``failed`` keep the first ``SUMMARY_ROWS`` records each (the manifest has
    them all), so a rank that inverts millions of images does not grow with them."""

    output: Path
    n_done: int = 0
    n_failed: int = 0
    done: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    skipped: int = 0
    skipped_failed: int = 0  # of ``skipped``: recorded as failed before (not retried)
    preempted: bool = False
    interrupted: bool = False  # Ctrl-C: state saved, exit 130
    resumed: int = 0  # images restored in flight from a checkpoint
    skipped_steps: int = 0
    rank: int = 0
    method: str = "nti"

    def add(self, rec: dict) -> None:
        ok = rec["status"] == "ok"
        self.n_done += ok
        self.n_failed += not ok
        rows = self.done if ok else self.failed
        if len(rows) < SUMMARY_ROWS:
            rows.append(rec)

    def merge(self, other: RunSummary) -> None:
        """Adds another rank's counts and rows: the launching rank reports the run, not only itself."""
        for name in ("n_done", "n_failed", "skipped", "skipped_failed", "resumed", "skipped_steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.done += other.done[: max(SUMMARY_ROWS - len(self.done), 0)]
        self.failed += other.failed[: max(SUMMARY_ROWS - len(self.failed), 0)]
        self.preempted |= other.preempted
        self.interrupted |= other.interrupted

    def save(self, path: Path) -> None:
        from nti_lightning.store.records import dumps

        fields = {k: v for k, v in vars(self).items() if k != "output"}
        atomic_write(path, dumps(fields).encode())

    @classmethod
    def load(cls, path: Path, output: Path) -> RunSummary:
        return cls(output=output, **json.loads(path.read_text(encoding="utf-8")))
