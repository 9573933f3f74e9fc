"""``nti eval`` on the bundled PIE-format sample: all outputs, and resume after kill -9 without redoing pairs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from nti_lightning.cli import main
from nti_lightning.eval.report import PER_IMAGE, read_records

SAMPLE = Path(__file__).resolve().parents[2] / "nti_lightning" / "assets" / "pie_sample"
FAST = ["--steps", "3", "--inner-steps", "2"]


def _eval_args(out: Path, methods: str, limit: int) -> list[str]:
    return ["eval", str(SAMPLE), "--methods", methods, "--out", str(out), "--limit", str(limit), *FAST]


def test_eval_writes_every_output(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(_eval_args(out, "ddim,direct", 2)) == 0
    recs = read_records(out)
    assert sorted((r["id"], r["method"]) for r in recs) == sorted(
        (i, m) for i in ("000000000000", "100000000001") for m in ("ddim", "direct")
    )
    for r in recs:
        for key in ("psnr_rec", "ssim_rec", "psnr_bg", "mse_bg", "ssim_bg", "seconds", "unet_calls", "mode"):
            assert key in r, key
        assert r["unet_calls"] == {"ddim": 3, "direct": 9}[r["method"]] + 3 * 4  # inversion + T·2·2 edit rows
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"ddim", "direct"} and "psnr_bg" in summary["ddim"]
    table = (out / "summary.md").read_text()
    assert "| ddim |" in table and "| direct |" in table and "Background PSNR" in table and "Recon PSNR" in table
    assert sorted(p.name for p in (out / "strips").iterdir()) == ["000000000000.png", "100000000001.png"]
    assert (out / "psnr_vs_time.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)
    err = capsys.readouterr().err
    assert "LPIPS skipped" in err and "CLIP similarity skipped" in err  # one line each, no download
    # a rerun does nothing; other settings into the same folder are refused
    assert main(_eval_args(out, "ddim,direct", 2)) == 0
    assert "0 pair(s) evaluated, 4 already done" in capsys.readouterr().out
    assert main([*_eval_args(out, "ddim", 2), "--guidance-scale", "5"]) == 2


@pytest.mark.slow  # multi-process: CI runs it (-m slow); the README test command skips it
def test_eval_resumes_after_kill_9_without_redoing_finished_pairs(tmp_path, capsys):
    out = tmp_path / "ev"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nti_lightning.cli", *_eval_args(out, "ddim,nti", 3)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not read_records(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        first = read_records(out)
        assert first, "no pair finished in time"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    done_before = {(r["id"], r["method"]) for r in read_records(out)}
    assert 1 <= len(done_before) < 6
    lines_before = (out / PER_IMAGE).read_text().splitlines()
    assert main(_eval_args(out, "ddim,nti", 3)) == 0
    assert f"{6 - len(done_before)} pair(s) evaluated, {len(done_before)} already done" in capsys.readouterr().out
    counts = Counter((r["id"], r["method"]) for r in read_records(out))
    assert len(counts) == 6 and set(counts.values()) == {1}, counts  # no pair twice
    assert (out / PER_IMAGE).read_text().splitlines()[: len(lines_before)] == lines_before


@pytest.mark.parametrize("bad", ["--methods=ddim,edict", "--methods=nti,nti"])
def test_eval_rejects_bad_methods(tmp_path, bad, capsys):
    assert main(["eval", str(SAMPLE), "--out", str(tmp_path / "x"), bad]) == 2
    assert "ddim, nti, npi, proxnpi, direct" in capsys.readouterr().err or bad.endswith("nti,nti")
