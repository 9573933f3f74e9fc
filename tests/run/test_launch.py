"""Launch modes of ``nti invert`` on CPU (gloo): ``ddp_spawn``, torchrun, an srun-style launch (2 processes with
the environment srun sets), SIGTERM to a 2-rank ``ddp`` run and its resume, ``output.subdirs``, the progress bar
and the metrics logger. Every multi-rank result is compared bit for bit with one single-rank reference run.
Random tiny model saved to a folder, 64 px, T = 3, N = 2, 4 images (2 per rank)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_outputs import assert_same_as_reference, read_nulls

from nti_lightning.cli import main
from nti_lightning.run import EXIT_PREEMPTED, RankFailedError, RunSummary, StopFlag, read_manifest
from nti_lightning.run.launch import settle_ranks
from nti_lightning.store.files import item_relpath

ROOT = Path(__file__).resolve().parents[2]
IDS = ["img0", "img1", "img2", "img3"]
T, N = 3, 2
# the exact codec: runs are compared bit for bit
FAST = [f"inversion.num_ddim_steps={T}", f"inversion.num_inner_steps={N}", "inversion.image_size=64",
        "inversion.batch_size=1", "output.compute_baseline=false", "output.save_strip=false",
        "output.checkpoint_every_s=0", "trainer.accelerator=cpu",
        "output.codec=fp32-delta-zstd"]  # fmt: skip
TWO_RANKS = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.ddp_timeout_s=60"]
NTI = ("nti", "nti (a rank it started)")  # how the ranks nti starts itself name their launcher
# variables of a launcher around pytest (a SLURM job, torchrun) that would leak into the runs started here
LAUNCH_VARS = re.compile(r"^(SLURM_|TORCHELASTIC_|PMI_|OMPI_)|^(MASTER_ADDR|MASTER_PORT|RANK|LOCAL_RANK|WORLD_SIZE|"
                         r"LOCAL_WORLD_SIZE|GROUP_RANK|NODE_RANK|GROUP_WORLD_SIZE|ROLE_RANK|ROLE_NAME)$")  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(noise_dataset):
    return noise_dataset


def _args(dataset, out, model_dir, *extra) -> list[str]:
    return ["invert", "--images", str(dataset), "--captions", str(dataset / "captions.jsonl"), "--output", str(out),
            f"model.spec={model_dir}", *FAST, *extra]  # fmt: skip


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not LAUNCH_VARS.match(k)}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture
def procs():
    """Processes started by a test; whatever still runs at its end is killed (each leads its own process group)."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _start(procs, cmd, log: Path, **env) -> subprocess.Popen:
    with open(log, "w") as f:  # the child keeps its own descriptor
        p = subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(p)
    return p


def _finish(p: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")


def _nti(dataset, out, model_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "nti_lightning.cli", *_args(dataset, out, model_dir, "--quiet", *extra)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_two_ranks(out, reference, environment: str) -> None:
    """Static sharding over exactly 2 ranks (image k → rank k mod 2), each image recorded exactly once, the
    per-rank manifests merge to the reference's results, and each rank logged which launcher Lightning saw."""
    lines = {r: [json.loads(x) for x in (out / f"manifest.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert [x["id"] for x in lines[0]] == ["img0", "img2"] and [x["id"] for x in lines[1]] == ["img1", "img3"]
    assert {x["rank"] for x in lines[1]} == {1}
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]
    assert sorted(p.name for p in (out / "logs").glob("*.log")) == ["rank0.log", "rank1.log"]  # no more ranks
    for r in (0, 1):
        text = (out / "logs" / f"rank{r}.log").read_text()
        assert f"rank{r} of 2 rank(s)" in text and f"launched by {environment[r]}" in text, text[:2000]
    assert_same_as_reference(out, reference, IDS)


@pytest.fixture(scope="module")
def reference(dataset, model_dir, tmp_path_factory):
    """One uninterrupted single-rank run in this process, not quiet: (output, null embeddings, its stderr)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(_args(dataset, out, model_dir)) == 0
    return out, read_nulls(out), err.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Launch modes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # multi-process: CI runs it (-m slow); the README test command skips it
def test_ddp_spawn_two_cpu_ranks(dataset, model_dir, reference, tmp_path, monkeypatch, capsys):
    """``trainer.strategy=ddp_spawn`` (as ``ddp``): this process is rank 0 and starts rank 1 as an ``nti`` process."""
    monkeypatch.delenv("MASTER_PORT", raising=False)  # Lightning sets it in this process: removed afterwards
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks' thread count
    out = tmp_path / "spawn"
    args = _args(dataset, out, model_dir, "--quiet", "trainer.devices=2", "trainer.strategy=ddp_spawn")
    assert main([*args, "trainer.ddp_timeout_s=60"]) == 0
    _assert_two_ranks(out, reference[1], NTI)
    out_text = capsys.readouterr().out  # one summary of both ranks, from the process that launched them
    assert out_text.count(" inverted, ") == 1 and "4 inverted, 0 failed, 0 already done" in out_text, out_text


@pytest.mark.slow  # multi-process: CI runs it (-m slow); the README test command skips it
def test_torchrun_launch(dataset, model_dir, reference, tmp_path, procs):
    """torchrun starts both ranks; Lightning's TorchElasticEnvironment reads rank and world size from it and no
    process is started besides (a second launch would make a world of 4 and show up as rank2/rank3 logs)."""
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_nti(dataset, out, model_dir, *TWO_RANKS)[1:]]  # fmt: skip
    log = tmp_path / "torchrun.log"
    assert _finish(_start(procs, cmd, log), log) == 0, log.read_text()[-3000:]
    _assert_two_ranks(out, reference[1], ("torchrun", "torchrun"))


@pytest.mark.slow  # multi-process: CI runs it (-m slow); the README test command skips it
def test_srun_style_launch(dataset, model_dir, reference, tmp_path, procs):
    """Two processes with the environment ``srun --ntasks-per-node=2`` gives its tasks (what Lightning's
    SLURMEnvironment reads: SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS_PER_NODE,
    SLURM_NNODES, SLURM_JOB_NAME not bash/interactive; the main address from SLURM_NODELIST, the port from
    MASTER_PORT). No signal is sent, so no ``scontrol requeue`` is tried."""
    out, port = tmp_path / "srun", str(_free_port())
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "nti-test", "SLURM_NTASKS": "2", "SLURM_NNODES": "1",
             "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1",
             "MASTER_PORT": port}  # fmt: skip
    logs = [tmp_path / f"task{r}.log" for r in (0, 1)]
    cmd = _nti(dataset, out, model_dir, *TWO_RANKS)
    tasks = [_start(procs, cmd, logs[r], SLURM_PROCID=str(r), SLURM_LOCALID=str(r), **slurm) for r in (0, 1)]
    for p, log in zip(tasks, logs):
        assert _finish(p, log) == 0, log.read_text()[-3000:]
    _assert_two_ranks(out, reference[1], ("srun", "srun"))
    assert not any("scontrol" in (out / "logs" / f"rank{r}.log").read_text() for r in (0, 1))


@pytest.mark.slow  # multi-process: CI runs it (-m slow); the README test command skips it
def test_sigterm_to_two_ddp_ranks_exits_75_and_resumes(dataset, model_dir, reference, tmp_path, procs):
    """``trainer.strategy=ddp`` (rank 0 starts rank 1): SIGTERM to the process group mid-batch → both ranks save
    their batch and the launcher exits 75; the rerun resumes the saved batches and ends bit-identical to the
    single-rank reference."""
    out, log = tmp_path / "term", tmp_path / "term.log"
    cmd = _nti(dataset, out, model_dir, *TWO_RANKS)
    p = _start(procs, cmd, log)
    ckpts = [out / "checkpoints" / f"shard0.rank{r}.pt" for r in (0, 1)]
    end = time.time() + 240
    while not all(c.is_file() for c in ckpts):  # both ranks inside a batch (checkpoint_every_s=0)
        assert p.poll() is None, log.read_text()[-3000:]
        assert time.time() < end, "timed out"
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGTERM)
    assert _finish(p, log, timeout=60) == EXIT_PREEMPTED, log.read_text()[-3000:]
    rank_logs = [(out / "logs" / f"rank{r}.log").read_text() for r in (0, 1)]
    assert all("preempted (signal 15" in x for x in rank_logs), rank_logs
    assert any(c.is_file() for c in ckpts)  # (a rank whose batch ended just then has its images recorded)

    log2 = tmp_path / "rerun.log"
    assert _finish(_start(procs, cmd, log2), log2) == 0, log2.read_text()[-3000:]
    assert any("resuming " in (out / "logs" / f"rank{r}.log").read_text() for r in (0, 1))
    _assert_two_ranks(out, reference[1], NTI)


def test_stop_signal_reaches_launched_ranks_and_their_outcomes_count(procs):
    """Unit level: a signal to the launcher is passed on to the ranks it started; their exit codes fold into the
    launcher's summary."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    procs.append(child)
    stop = StopFlag()
    try:
        stop.forward(lambda: [child.pid])
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and child.wait(timeout=30) == -signal.SIGTERM
    finally:
        stop.restore()

    s = RunSummary(Path("out"))
    settle_ranks(s, {1: 0, 2: 0})
    assert not s.preempted
    settle_ranks(s, {1: 0, 2: EXIT_PREEMPTED})
    assert s.preempted
    with pytest.raises(RankFailedError, match=r"rank\(s\) \[2\] failed"):
        settle_ranks(RunSummary(Path("out")), {1: -signal.SIGTERM, 2: 1})


# ---------------------------------------------------------------------------------------------------------
# Output layout, progress bar, logs (single rank, in this process)
# ---------------------------------------------------------------------------------------------------------


def test_subdirs_layout_rerun_status_edit_and_tensorboard_logger(dataset, model_dir, reference, tmp_path, capsys):
    """``output.subdirs=true`` (here also ``--quiet`` and ``output.logger=tensorboard``)."""
    out = tmp_path / "sub"
    args = _args(dataset, out, model_dir, "--quiet", "output.subdirs=true", "output.logger=tensorboard")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert not any(re.search(rf"{k}\s+ok", err) for k in IDS), err  # --quiet: no per-image rows

    recs = read_manifest(out)
    for k in IDS:
        rel = item_relpath(k, subdirs=True)
        assert re.fullmatch(rf"images/[0-9a-f]{{2}}/{k}", rel) and (out / rel / "inversion.safetensors").is_file()
        assert recs[k]["paths"]["inversion"] == f"{rel}/inversion.safetensors"
        assert not (out / k).exists() and not (out / "images" / k).exists()
    assert_same_as_reference(out, reference[1], IDS)

    # the metrics logger: TensorBoard when installed, otherwise CSV and a warning in the log
    from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE

    metrics = out / "logs" / "metrics_shard0" / "version_0"
    if _TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE:
        assert list(metrics.glob("events.out.tfevents.*"))
    else:
        assert "neither tensorboard nor tensorboardX is installed" in (out / "logs" / "rank0.log").read_text()
        assert (metrics / "metrics.csv").is_file()

    assert main(args) == 0  # a rerun finds them all done
    assert "0 inverted, 0 failed, 4 already done" in capsys.readouterr().out
    assert main(["status", str(out)]) == 0
    assert "4 done, 0 failed, 0 pending of 4" in capsys.readouterr().out

    # `nti edit OUTPUT --edits`: image ids are found through the manifests; the edits land in the job's folder
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"image_id": "img1", "target": "a photo of thing 7"}) + "\n")
    assert main(["edit", str(out), "--edits", str(edits), "--device", "cpu", "output.subdirs=true"]) == 0
    res = [json.loads(x) for x in (out / "edits" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in res] == ["ok"], res
    assert res[0]["paths"]["edit"].startswith(f"edits/{item_relpath('img1', subdirs=True)}/0001_")
    assert (out / res[0]["paths"]["edit"]).is_file()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_csv_metrics(dataset, model_dir, reference, tmp_path):
    """Redirected (the reference run): whole lines only, no carriage-return bar updates, per-image rows. On a
    terminal: rank 0's bar shows done/total and images per hour. The CSV logger has one row per finished image
    whose inner steps equal the manifest's count of the image."""
    out, _, err = reference
    assert "\r" not in err and re.search(r"img0\s+ok", err)
    term = _Terminal()
    with contextlib.redirect_stderr(term):
        assert main(_args(dataset, tmp_path / "tty", model_dir)) == 0
    bar = term.getvalue().replace("\r", "\n")
    assert re.search(r"rank0 inverting:\s+100%.*\b4/4\b", bar), bar[-2000:]  # final state
    assert re.search(r"rank0 inverting:.*\b0/4\b", bar), bar[-2000:]  # before the first image is done
    assert "img_per_h=" in bar and re.search(r"img0\s+ok", bar)

    with open(out / "logs" / "metrics_shard0" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(IDS) and [int(r["step"]) for r in rows] == list(range(len(IDS)))
    assert set(rows[0]) >= {"loss_mean", "loss_max", "inner_steps_mean", "inner_steps_total"}
    assert not any(c.startswith("loss/") for c in rows[0])  # fixed columns, not one per image
    recs = read_manifest(out)
    for row, k in zip(rows, IDS):  # one rank, one row per call: images finish in stream order
        assert float(row["inner_steps_total"]) == recs[k]["metrics"]["inner_steps"]
        assert float(row["loss_max"]) >= float(row["loss_mean"]) > 0
    assert (out / "logs" / "rank0.log").is_file()
