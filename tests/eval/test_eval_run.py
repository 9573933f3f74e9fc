"""``nti eval`` on the bundled PIE-format sample, on the run layer: every output, resume after a stop signal and
after kill -9 without redoing pairs, one run per folder, mixed precision, array tasks and ranks splitting the
entries, dotlist overrides, hostile entry ids."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from nti_lightning.cli import EXIT_CONFIG_ERROR, EXIT_PREEMPTED, main
from nti_lightning.eval.report import read_records
from nti_lightning.jobs.eval import EvalWorker
from nti_lightning.store.files import HOST

SAMPLE = Path(__file__).resolve().parents[2] / "nti_lightning" / "assets" / "pie_sample"
FAST = ["--steps", "3", "--inner-steps", "2", "--batch-size", "1", "trainer.accelerator=cpu"]
METRICS = ("psnr_rec", "ssim_rec", "psnr_bg", "mse_bg", "ssim_bg", "mode", "unet_calls")

pytestmark = pytest.mark.usefixtures("one_thread")


def _eval_args(out: Path, methods: str, limit: int, *extra) -> list[str]:
    return ["eval", str(SAMPLE), "--methods", methods, "--out", str(out), "--limit", str(limit), *FAST, *extra]


def _results(out: Path) -> dict:
    return {(r["image_id"], r["method"]): {k: r[k] for k in METRICS} for r in read_records(out)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: 3 entries × (ddim, nti)."""
    out = tmp_path_factory.mktemp("ref") / "ev"
    assert main(_eval_args(out, "ddim,nti", 3, "--quiet")) == 0
    return out, _results(out)


def test_eval_writes_every_output(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(_eval_args(out, "ddim,direct", 2)) == 0
    recs = read_records(out)
    assert sorted((r["image_id"], r["method"]) for r in recs) == sorted(
        (i, m) for i in ("000000000000", "100000000001") for m in ("ddim", "direct")
    )
    for r in recs:
        for key in ("psnr_rec", "ssim_rec", "psnr_bg", "mse_bg", "ssim_bg", "seconds", "unet_calls", "mode"):
            assert key in r, key
        assert r["unet_calls"] == {"ddim": 3, "direct": 9}[r["method"]] + 3 * 4  # inversion + T·2·2 edit rows
        assert r["id"] == f"{r['image_id']}/{r['method']}" and all((out / p).is_file() for p in r["paths"].values())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"ddim", "direct"} and "psnr_bg" in summary["ddim"]
    table = (out / "summary.md").read_text()
    assert "| ddim |" in table and "| direct |" in table and "Background PSNR" in table and "Recon PSNR" in table
    assert sorted(p.name for p in (out / "strips").iterdir()) == ["000000000000.png", "100000000001.png"]
    assert (out / "psnr_vs_time.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)
    assert len((out / "per_image.jsonl").read_text().splitlines()) == 4
    identity = json.loads((out / "run.json").read_text())
    assert identity["job"] == "eval" and identity["precision"] == "32-true"  # "auto" on CPU, as recorded
    assert "num_ddim_steps: 3" in (out / "config.yaml").read_text()
    err = capsys.readouterr().err
    assert "LPIPS skipped" in err and "CLIP similarity skipped" in err  # one line each, no download
    # a rerun does nothing; other settings into the same folder are refused, naming the key
    assert main(_eval_args(out, "ddim,direct", 2)) == 0
    assert "0 pair(s) evaluated, 0 failed, 4 already done" in capsys.readouterr().out
    assert main([*_eval_args(out, "ddim", 2), "--guidance-scale", "5"]) == EXIT_CONFIG_ERROR
    assert "inversion.guidance_scale: 7.5 there, 5.0 now" in capsys.readouterr().err
    assert main([*_eval_args(out, "ddim", 2), "inversion.guidance_scale=5"]) == EXIT_CONFIG_ERROR  # the same key
    assert main([*_eval_args(out, "ddim", 2), "inversion.guidance_scal=5"]) == EXIT_CONFIG_ERROR
    assert "inversion.guidance_scal" in capsys.readouterr().err


def test_a_stop_signal_ends_the_run_and_a_rerun_redoes_only_the_rest(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ev"
    real = EvalWorker.record

    def record(self, entry, method, status, **fields):
        real(self, entry, method, status, **fields)
        self.stop.signum = signal.SIGTERM  # what the handler sets: the loop stops after the next UNet call

    with monkeypatch.context() as m:
        m.setattr(EvalWorker, "record", record)
        assert main(_eval_args(out, "ddim,nti", 3)) == EXIT_PREEMPTED
    done_before = {k: v for k, v in _results(out).items()}
    assert 1 <= len(done_before) < 6 and "preempted" in (out / "logs" / "rank0.log").read_text()
    capsys.readouterr()
    assert main(_eval_args(out, "ddim,nti", 3)) == 0
    n = len(done_before)
    assert f"{6 - n} pair(s) evaluated, 0 failed, {n} already done" in capsys.readouterr().out
    assert _results(out) == reference[1]  # batch size 1: the same numbers as an uninterrupted run
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(Counter(r["id"] for r in lines).values()) == [1] * 6  # no pair twice


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, capsys):
    out = tmp_path / "ev"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "locks").mkdir(parents=True)
        (out / "locks" / "shard0.lock").write_text(json.dumps({"host": HOST, "pid": holder.pid, "started": "x"}))
        assert main(_eval_args(out, "ddim", 1)) == EXIT_CONFIG_ERROR
        err = capsys.readouterr().err
        assert "in use by another run" in err and str(holder.pid) in err and "Traceback" not in err
        assert not list(out.glob("manifest*.jsonl")) and not (out / "run.json").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_runs_on_cpu_close_to_fp32(reference, tmp_path, precision):
    out = tmp_path / precision
    assert main(_eval_args(out, "nti", 1, f"trainer.precision={precision}")) == 0
    assert json.loads((out / "run.json").read_text())["precision"] == precision
    got, ref = _results(out)[("000000000000", "nti")], reference[1][("000000000000", "nti")]
    assert got["unet_calls"] <= ref["unet_calls"] + 6  # early stopping may differ by a few steps
    assert abs(got["psnr_rec"] - ref["psnr_rec"]) < 0.5 and abs(got["psnr_bg"] - ref["psnr_bg"]) < 0.5


def test_two_array_tasks_split_the_entries_into_one_folder(reference, tmp_path, capsys):
    out = tmp_path / "ev"
    for shard in (0, 1):
        assert main(_eval_args(out, "ddim,nti", 3, "--shard-index", str(shard), "--num-shards", "2")) == 0
    m0 = [json.loads(x) for x in (out / "manifest.shard0.rank0.jsonl").read_text().splitlines()]
    m1 = [json.loads(x) for x in (out / "manifest.shard1.rank0.jsonl").read_text().splitlines()]
    assert {r["image_id"] for r in m0} == {"000000000000", "200000000002"} and len(m0) == 4
    assert {r["image_id"] for r in m1} == {"100000000001"} and len(m1) == 2
    assert _results(out) == reference[1]  # the summary of the last task covers both
    assert "Images per method: ddim 3, nti 3" in (out / "summary.md").read_text()
    assert main(["status", str(out)]) == 0
    assert "6 done, 0 failed, 0 pending of 6" in capsys.readouterr().out


def test_an_unsafe_entry_id_is_skipped_and_nothing_is_written_outside(tmp_path, capsys):
    data = tmp_path / "pie"
    shutil.copytree(SAMPLE / "annotation_images", data / "annotation_images")
    mapping = json.loads((SAMPLE / "mapping_file.json").read_text())
    first = next(iter(mapping.values()))
    (data / "mapping_file.json").write_text(json.dumps({"../../evil": first, "good": first}))
    out = tmp_path / "deep" / "ev"
    assert main(["eval", str(data), "--methods", "ddim", "--out", str(out), *FAST]) == 0
    assert "../../evil" in capsys.readouterr().err
    assert [r["image_id"] for r in read_records(out)] == ["good"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "pie"] and not (out.parent / "evil").exists()


@pytest.mark.slow  # multi-process: CI runs it (-m slow); the README test command skips it
def test_eval_resumes_after_kill_9_without_redoing_finished_pairs(reference, tmp_path, capsys):
    out = tmp_path / "ev"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nti_lightning.cli", *_eval_args(out, "ddim,nti", 3)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not read_records(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    done_before = len(read_records(out))
    assert 1 <= done_before < 6
    assert main(_eval_args(out, "ddim,nti", 3)) == 0
    assert f"{6 - done_before} pair(s) evaluated, 0 failed, {done_before} already done" in capsys.readouterr().out
    assert _results(out) == reference[1]


@pytest.mark.slow  # multi-process: CI runs it (-m slow); the README test command skips it
def test_two_ranks_split_the_entries(reference, tmp_path):
    out = tmp_path / "ev"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nti_lightning.cli", *_eval_args(out, "ddim,nti", 3, "trainer.devices=2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m0 = [json.loads(x) for x in (out / "manifest.rank0.jsonl").read_text().splitlines()]
    m1 = [json.loads(x) for x in (out / "manifest.rank1.jsonl").read_text().splitlines()]
    assert {r["image_id"] for r in m0} == {"000000000000", "200000000002"}
    assert {r["image_id"] for r in m1} == {"100000000001"} and {r["rank"] for r in m1} == {1}
    assert "6 pair(s) evaluated" in proc.stdout  # one report of the whole run
    assert _results(out) == reference[1]


@pytest.mark.parametrize("bad", ["--methods=ddim,edict", "--methods=nti,nti"])
def test_eval_rejects_bad_methods(tmp_path, bad, capsys):
    assert main(["eval", str(SAMPLE), "--out", str(tmp_path / "x"), bad]) == 2
    assert "ddim, nti, npi, proxnpi, direct" in capsys.readouterr().err or bad.endswith("nti,nti")
