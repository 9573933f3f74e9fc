"""Recovery of ``nti invert`` (issue #27 items 4, 6, 8): orphaned ranks do not double-run; a corrupt checkpoint is
named and its images start over; a kill before any periodic checkpoint resumes bit-identically at batch 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_outputs import ROOT, invert_args, read_nulls, spawn_invert, wait_for

from nti_lightning.cli import main
from nti_lightning.exit_codes import EXIT_PREEMPTED
from nti_lightning.jobs.invert import InvertWorker
from nti_lightning.run import read_manifest
from nti_lightning.store.records import INDEX_DIR, id_key, read_index_file

IDS = [f"img{k}" for k in range(6)]

pytestmark = pytest.mark.usefixtures("one_thread")


def _committed_keys(out: Path) -> list[bytes]:
    """The id keys of every index entry of every worker: one per commit (a manifest line whose entry is missing,
    cut off by a kill between the two, is not a commit: that item is redone and its later line wins)."""
    entries = [read_index_file(p) for p in sorted((out / INDEX_DIR).glob("*.idx"))]
    return sorted(bytes(k) for e in entries for k in e["key"])


@pytest.mark.slow  # multi-process: CI runs it (-m slow)
def test_a_killed_launcher_leaves_no_rank_running_beside_the_rerun(noise_dataset, model_dir, tmp_path):
    """kill -9 of the process that started rank 1: rank 1 gets SIGTERM (parent-death signal), saves and exits;
    a rerun started at once waits for it (it still holds its claim), then completes: every image recorded
    exactly once, results equal to a single-rank run."""
    ref = tmp_path / "ref"
    assert main(invert_args(noise_dataset, ref, model_dir)) == 0
    out = tmp_path / "out"
    two = ("trainer.devices=2", "trainer.strategy=ddp", "trainer.ddp_timeout_s=120")
    launcher = spawn_invert(noise_dataset, out, model_dir, *two)
    wait_for(
        lambda: (out / "checkpoints" / "shard0.rank1.pt").is_file() and (out / "manifest.rank0.jsonl").is_file(),
        launcher,
        timeout=240,
    )
    launcher.kill()  # SIGKILL: no handler runs, no signal is passed on
    launcher.communicate(timeout=60)
    rerun = subprocess.run(
        [sys.executable, "-m", "nti_lightning.cli", *invert_args(noise_dataset, out, model_dir, *two)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert _committed_keys(out) == sorted(id_key(i) for i in IDS)  # 6 commits for 6 ids: no rank ran twice
    assert sorted(read_manifest(out)) == IDS
    assert "preempted" in (out / "logs" / "rank1.log").read_text()  # the orphan saved and stopped
    got, want = read_nulls(out), read_nulls(ref)
    assert all((got[k] == want[k]).all() for k in IDS)


def test_a_corrupt_checkpoint_is_named_and_its_images_start_over(noise_dataset, model_dir, tmp_path, monkeypatch):
    """64 bytes flipped inside a checkpoint's tensor data: one line saying it is corrupt, its images start over,
    nothing non-finite is recorded, the results equal an uninterrupted run's (one row: batch-independent)."""
    ref = tmp_path / "ref"
    assert main(invert_args(noise_dataset, ref, model_dir)) == 0
    out = tmp_path / "out"
    real = InvertWorker.on_event

    def on_event(self, event):
        if getattr(event, "number", None) == 12:
            self.stop.signum = signal.SIGTERM
        return real(self, event)

    with monkeypatch.context() as m:
        m.setattr(InvertWorker, "on_event", on_event)
        assert main(invert_args(noise_dataset, out, model_dir)) == EXIT_PREEMPTED
    ckpt = out / "checkpoints" / "shard0.rank0.pt"
    data = bytearray(ckpt.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0x5A for b in data[mid : mid + 64])
    ckpt.write_bytes(bytes(data))
    assert main(invert_args(noise_dataset, out, model_dir)) == 0
    log = (out / "logs" / "rank0.log").read_text()
    assert "is corrupt (its checksum does not match" in log and "its images start over" in log
    got, want = read_nulls(out), read_nulls(ref)
    assert sorted(got) == IDS and all((got[k] == want[k]).all() for k in IDS)


@pytest.mark.slow  # multi-process: CI runs it (-m slow)
def test_a_kill_before_any_periodic_checkpoint_resumes_bit_identically_at_batch_2(noise_dataset, model_dir, tmp_path):
    """Batched (2 rows, 3 slots, default mode), checkpoints every hour: a kill -9 after some images finished. The
    first checkpoint was written when the stream started, so the rerun replays the same stream (the finished
    images run again as ghosts, unwritten) and every result equals the uninterrupted run's bit for bit."""
    settings = ("inversion.batch_size=2", "output.checkpoint_every_s=3600")
    ref = tmp_path / "ref"
    assert main(invert_args(noise_dataset, ref, model_dir, *settings)) == 0
    out = tmp_path / "out"
    proc = spawn_invert(noise_dataset, out, model_dir, *settings)
    manifest = out / "manifest.jsonl"
    wait_for(lambda: manifest.is_file() and len(manifest.read_text().splitlines()) >= 2, proc, timeout=240)
    proc.kill()
    proc.communicate(timeout=60)
    assert 1 <= len(_committed_keys(out)) < len(IDS), "kill came too late"
    time.sleep(0.1)
    assert main(invert_args(noise_dataset, out, model_dir, *settings)) == 0
    got, want = read_nulls(out), read_nulls(ref)
    assert sorted(got) == IDS and all((got[k] == want[k]).all() for k in IDS)
    assert sorted(read_manifest(out)) == IDS
    assert _committed_keys(out) == sorted(id_key(i) for i in IDS)  # the ghosts were not committed again
