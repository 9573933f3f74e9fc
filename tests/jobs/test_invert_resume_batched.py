"""Resume with several images in flight (2 rows, 3 slots, default batched mode): bit-identical to an
uninterrupted run, also when images finished after the checkpoint was taken (kill -9 before the next one)."""

import json
import shutil
import signal

import pytest
from run_outputs import assert_same_as_reference, read_nulls

from nti_lightning.cli import EXIT_PREEMPTED, main
from nti_lightning.jobs.invert import InvertWorker
from nti_lightning.run import read_manifest
from nti_lightning.store.records import OK, RecordLog

IDS = ["img0", "img1", "img2", "img3", "img4"]
# the exact codec: runs are compared bit for bit
FAST = ["inversion.num_ddim_steps=3", "inversion.num_inner_steps=2", "inversion.image_size=64",
        "inversion.batch_size=2", "output.compute_baseline=false", "output.save_strip=false",
        "output.checkpoint_every_s=3600", "trainer.accelerator=cpu",
        "output.codec=fp32-delta-zstd"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(dataset, out, model_dir):
    return ["invert", "--images", str(dataset), "--captions", str(dataset / "captions.jsonl"), "--output", str(out),
            f"model.spec={model_dir}", "--quiet", *FAST]  # fmt: skip


def _stop_at_tick(monkeypatch, n: int) -> None:
    """Makes the worker see a SIGTERM after its n-th UNet call (as the signal handler would set it)."""
    real = InvertWorker.on_event

    def on_event(self, event):
        if getattr(event, "number", None) == n:
            self.stop.signum = signal.SIGTERM
        return real(self, event)

    monkeypatch.setattr(InvertWorker, "on_event", on_event)


def test_ghost_images_keep_the_resumed_stream_identical(noise_dataset, model_dir, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    assert main(_args(noise_dataset, ref, model_dir)) == 0
    reference = read_nulls(ref)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _stop_at_tick(m, 6)
        assert main(_args(noise_dataset, out, model_dir)) == EXIT_PREEMPTED
    ckpt = out / "checkpoints" / "shard0.rank0.pt"
    assert ckpt.is_file()
    frozen = tmp_path / "frozen"  # the folder as the signal left it
    shutil.copytree(out, frozen)

    assert main(_args(noise_dataset, out, model_dir)) == 0  # resume to the end
    assert_same_as_reference(out, reference, IDS)

    # kill -9 after some images finished past the checkpoint: their records and files exist, the checkpoint is
    # older. The rerun runs them again (same stream for the others) without writing them again.
    before = {r["id"] for r in read_manifest(frozen).values()}
    lines = (out / "manifest.jsonl").read_text().splitlines()
    later = [json.loads(x) for x in lines if json.loads(x)["id"] not in before][:2]
    assert later, "some images must finish after the checkpoint"
    log = RecordLog(frozen / "manifest.jsonl", frozen / ".nti/index/rank0.idx", frozen / ".nti/failures/rank0.jsonl")
    for rec in later:
        log.append(rec, OK, prompt=rec["prompt"])  # as the killed run committed them
        shutil.copytree(out / "images" / rec["id"], frozen / "images" / rec["id"], dirs_exist_ok=True)
    assert main(_args(noise_dataset, frozen, model_dir)) == 0
    assert_same_as_reference(frozen, reference, IDS)
    ids = [json.loads(x)["id"] for x in (frozen / "manifest.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) == IDS  # every image recorded once: the ghosts were not re-written
