"""Scale-out and resilience of ``nti invert`` on CPU: 2 DDP ranks, SIGTERM and kill -9 resume, stale
checkpoints, mixed precision. Random tiny model saved to a folder, 64 px, T = 3, N = 2."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_outputs import assert_same_as_reference, read_nulls

from nti_lightning.cli import main
from nti_lightning.run import EXIT_PREEMPTED
from nti_lightning.run.checkpoint import WorkerCheckpointIO

ROOT = Path(__file__).resolve().parents[2]
IDS = ["img0", "img1", "img2"]
# the exact codec: runs are compared bit for bit
FAST = ["inversion.num_ddim_steps=3", "inversion.num_inner_steps=2", "inversion.image_size=64",
        "inversion.batch_size=1", "output.compute_baseline=false", "output.save_strip=false",
        "output.checkpoint_every_s=0", "trainer.accelerator=cpu",
        "output.codec=fp32-delta-zstd"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(noise_dataset):
    return noise_dataset


def _args(dataset, out, model_dir, *extra):
    return ["invert", "--images", str(dataset), "--captions", str(dataset / "captions.jsonl"), "--output", str(out),
            f"model.spec={model_dir}", "--quiet", *FAST, *extra]  # fmt: skip


def _spawn(dataset, out, model_dir, *extra) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "nti_lightning.cli", *_args(dataset, out, model_dir, *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(pred, proc, timeout=120.0) -> None:
    end = time.time() + timeout
    while not pred():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < end, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(dataset, model_dir, tmp_path_factory):
    """One uninterrupted single-rank run (in process)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(_args(dataset, out, model_dir)) == 0
    return out, read_nulls(out)


@pytest.mark.slow  # multi-process: CI runs it (-m slow); the README test command skips it
def test_two_ddp_ranks_shard_statically_and_match_one_rank(dataset, model_dir, reference, tmp_path):
    out = tmp_path / "ddp"
    proc = _spawn(dataset, out, model_dir, "trainer.strategy=ddp", "trainer.devices=2", "trainer.ddp_timeout_s=60")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert log.count(" inverted, ") == 1 and "3 inverted, 0 failed, 0 already done" in log, log  # one summary
    m0 = [json.loads(x) for x in (out / "manifest.rank0.jsonl").read_text().splitlines()]
    m1 = [json.loads(x) for x in (out / "manifest.rank1.jsonl").read_text().splitlines()]
    assert [r["id"] for r in m0] == ["img0", "img2"] and [r["id"] for r in m1] == ["img1"]  # each image once
    assert {r["rank"] for r in m1} == {1} and (out / "logs" / "rank1.log").is_file()
    assert_same_as_reference(out, reference[1], IDS)  # manifests merge; bit-identical to one rank
    assert {json.loads((out / "progress" / f"rank{r}.json").read_text())["total"] for r in (0, 1)} == {3}
    assert main(["status", str(out)]) == 0


@pytest.mark.slow  # multi-process: CI runs it (-m slow); the README test command skips it
def test_sigterm_saves_state_exits_and_resumes_bit_identically(dataset, model_dir, reference, tmp_path, capsys):
    out = tmp_path / "term"
    proc = _spawn(dataset, out, model_dir)
    _wait_for(lambda: (out / "checkpoints" / "shard0.rank0.pt").is_file(), proc)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, log[-3000:]
    assert time.time() - t0 < 30 and "preempted" in log
    assert (out / "checkpoints" / "shard0.rank0.pt").is_file()
    assert main(["status", str(out)]) == 0
    assert "stopped mid-way" in capsys.readouterr().out

    # an in-flight image whose file changed since the checkpoint (here: its recorded pixel hash) starts over
    stale = tmp_path / "stale"
    shutil.copytree(out, stale)
    io_ = WorkerCheckpointIO()
    ck = io_.load_checkpoint(stale / "checkpoints" / "shard0.rank0.pt")
    items = json.loads(ck["items"])
    changed = sorted(items)[0]
    items[changed]["sha256"] = "0" * 64
    ck["items"] = json.dumps(items)
    io_.save_checkpoint(ck, stale / "checkpoints" / "shard0.rank0.pt")
    assert main(_args(dataset, stale, model_dir)) == 0
    assert "changed since the checkpoint; it starts over" in (stale / "logs" / "rank0.log").read_text()
    assert_same_as_reference(stale, reference[1], IDS)
    # a checkpoint made with other engine settings is not reused
    other = tmp_path / "other"
    shutil.copytree(out, other)
    ck = io_.load_checkpoint(other / "checkpoints" / "shard0.rank0.pt")
    ident = json.loads(ck["identity"])
    ident["slots"] += 1
    ck["identity"] = json.dumps(ident, sort_keys=True)
    io_.save_checkpoint(ck, other / "checkpoints" / "shard0.rank0.pt")
    assert main(_args(dataset, other, model_dir)) == 0
    assert "ignoring checkpoint" in (other / "logs" / "rank0.log").read_text()
    assert_same_as_reference(other, reference[1], IDS)

    # changed hyperparameters with a mid-batch checkpoint: refused, checkpoint kept; --overwrite drops it
    assert main(_args(dataset, out, model_dir, "inversion.guidance_scale=5.0")) == 2
    assert "other settings" in capsys.readouterr().err
    assert (out / "checkpoints" / "shard0.rank0.pt").is_file()

    assert main(_args(dataset, out, model_dir)) == 0  # resume
    assert "resuming " in (out / "logs" / "rank0.log").read_text()
    assert_same_as_reference(out, reference[1], IDS)


@pytest.mark.slow  # multi-process: CI runs it (-m slow); the README test command skips it
@pytest.mark.parametrize("moment", ["first checkpoint", "first image written"])
def test_kill_9_at_a_random_moment_then_rerun(dataset, model_dir, reference, tmp_path, moment):
    out = tmp_path / "kill"
    proc = _spawn(dataset, out, model_dir)
    if moment == "first checkpoint":
        _wait_for(lambda: (out / "checkpoints" / "shard0.rank0.pt").is_file(), proc)
    else:
        _wait_for(lambda: (out / "manifest.jsonl").is_file() and (out / "manifest.jsonl").stat().st_size > 0, proc)
    time.sleep(random.Random(moment).uniform(0.0, 0.3))
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert main(_args(dataset, out, model_dir)) == 0
    assert_same_as_reference(out, reference[1], IDS)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_runs_on_cpu_close_to_fp32(dataset, model_dir, reference, tmp_path, precision):
    out = tmp_path / precision
    assert main(_args(dataset, out, model_dir, f"trainer.precision={precision}", "data.num_shards=3")) == 0
    got = read_nulls(out)["img0"]
    meta = json.loads((out / "images" / "img0" / "meta.json").read_text())
    assert meta["precision"] == precision and "skipped_steps" in meta["metrics"]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    ref = reference[1]["img0"]
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.slow  # torch.compile's first call: CI runs it (-m slow); the README test command skips it
def test_compiled_unet_option(dataset, model_dir, reference, tmp_path, monkeypatch):
    """model.compile wraps the UNet in torch.compile (here with dynamo's "eager" backend, so no minutes of
    inductor compilation in the suite): the run goes through the compiled module and gives the same results."""
    calls = []
    real_compile = torch.compile

    def eager_compile(module, mode=None, **kw):
        calls.append(mode)
        return real_compile(module, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager_compile)
    out = tmp_path / "out"
    assert main(_args(dataset, out, model_dir, "model.compile=default")) == 0
    assert calls == ["default"]
    assert_same_as_reference(out, reference[1], IDS)
