"""Hard to misuse: one run per folder, exit codes, one-line errors, Ctrl-C, a light CLI, readable files."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nti_lightning.cli import EXIT_ALL_FAILED, EXIT_CONFIG_ERROR, EXIT_INTERRUPTED, main
from nti_lightning.run.files import HOST
from nti_lightning.run.lock import OutputLock, OutputLockedError
from nti_lightning.run.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
IDS = ["img0", "img1", "img2"]
FAST = ["inversion.num_ddim_steps=2", "inversion.num_inner_steps=1", "inversion.image_size=64",
        "inversion.batch_size=2", "output.compute_baseline=false", "output.save_strip=false",
        "trainer.accelerator=cpu"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(data, out, model_dir, *extra):
    return ["invert", "--images", str(data), "--captions", str(data / "captions.jsonl"), "--output", str(out),
            f"model.spec={model_dir}", "--quiet", *FAST, *extra]  # fmt: skip


def test_a_second_run_on_a_locked_folder_is_refused(noise_dataset, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "locks").mkdir(parents=True)
        (out / "locks" / "shard0.lock").write_text(json.dumps({"host": HOST, "pid": holder.pid, "started": "x"}))
        assert main(_args(noise_dataset, out, model_dir)) == EXIT_CONFIG_ERROR
        err = capsys.readouterr().err
        assert "in use by another run" in err and str(holder.pid) in err and "Traceback" not in err
        assert not list(out.glob("manifest*.jsonl"))  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over, and released at the end
    assert main(_args(noise_dataset, out, model_dir)) == 0
    assert "taking over the stale lock" in (out / "logs" / "rank0.log").read_text()
    assert not (out / "locks" / "shard0.lock").exists()


def test_lock_from_another_host_is_respected_until_stale(tmp_path):
    lock = OutputLock(tmp_path)
    lock.path.parent.mkdir(parents=True)
    lock.path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    with pytest.raises(OutputLockedError, match="elsewhere"):
        lock.acquire(print)
    old = lock.path.stat().st_mtime - 3600
    os.utime(lock.path, (old, old))  # no heartbeat for an hour
    lock.acquire(lambda *_: None)
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists()


def test_every_image_failed_exits_4(noise_dataset, model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(_args(noise_dataset, out, model_dir, "inversion.guidance_scale=1e30")) in (EXIT_ALL_FAILED, 0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    (bad / "captions.jsonl").write_text('{"image": "a.png", "prompt": "x"}\n')
    assert main(_args(bad, tmp_path / "out2", model_dir)) == EXIT_ALL_FAILED


def test_user_mistakes_are_one_line_with_exit_2(noise_dataset, model_dir, tmp_path, capsys):
    cases = [
        _args(tmp_path / "missing", tmp_path / "o1", model_dir),  # input path that does not exist
        _args(noise_dataset, tmp_path / "o2", tmp_path / "no-model"),  # model path that does not exist
        _args(noise_dataset, tmp_path / "o3", model_dir, "inversion.learning_rate=-1"),  # out of range
        _args(noise_dataset, tmp_path / "o4", model_dir, "inversion.guidance_scale=high"),  # wrong type
    ]
    for argv in cases:
        assert main(argv) == EXIT_CONFIG_ERROR, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_ctrl_c_saves_and_exits_130_then_resumes(noise_dataset, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = Worker.on_event

    def on_event(self, event):
        if getattr(event, "number", None) == 3:
            self.stop.signum = signal.SIGINT  # what the handler sets on Ctrl-C
        return real(self, event)

    with monkeypatch.context() as m:
        m.setattr(Worker, "on_event", on_event)
        assert main(_args(noise_dataset, out, model_dir)) == EXIT_INTERRUPTED
    assert (out / "checkpoints" / "shard0.rank0.pt").is_file()
    assert "interrupted" in (out / "logs" / "rank0.log").read_text()
    assert main(_args(noise_dataset, out, model_dir)) == 0
    assert "resuming " in (out / "logs" / "rank0.log").read_text()


def test_outputs_are_readable_and_config_paths_absolute(noise_dataset, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(_args(noise_dataset, Path("rel-out"), model_dir)) == 0
    inv = tmp_path / "rel-out" / "img0" / "inversion.safetensors"
    umask = os.umask(0)
    os.umask(umask)
    assert inv.stat().st_mode & 0o777 == 0o666 & ~umask
    cfg = (tmp_path / "rel-out" / "config.yaml").read_text()
    assert f"dir: {tmp_path / 'rel-out'}" in cfg


def test_cli_starts_without_torch_and_has_a_version():
    code = "import sys, nti_lightning.cli as c; c.build_parser(); import nti_lightning.status; "
    code += "print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert res.stdout.strip() == "False", res.stderr
    res = subprocess.run([sys.executable, "-m", "nti_lightning.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("nti_lightning ")


def test_image_size_null_equals_the_size_it_resolves_to(noise_dataset, model_dir, random_model, tmp_path, capsys):
    out = tmp_path / "out"
    native = random_model.native_image_size
    base = [a for a in _args(noise_dataset, out, model_dir) if not a.startswith("inversion.image_size")]
    assert main([*base, f"inversion.image_size={native}"]) == 0
    capsys.readouterr()
    assert main([*base, "inversion.image_size=null"]) == 0  # the same run: nothing redone
    assert f"0 inverted, 0 failed, {len(IDS)} already done" in capsys.readouterr().out
