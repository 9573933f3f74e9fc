"""The shipped SLURM templates run as submitted: ``bash TEMPLATE.sbatch ARGS`` (the ``#SBATCH`` lines are comments
to bash) with stand-ins for ``srun`` (starts ``$SLURM_NTASKS`` copies of its command with each task's
SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID, waits, exits with the highest code) and ``scontrol`` (records its
arguments), the environment SLURM gives an array task or a one-node job, and CPU overrides appended (they win
over the template's ``trainer.accelerator=gpu``: OmegaConf applies a dotlist in order). Outcomes only: exit
codes, every image recorded once, its files."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "scripts" / "slurm"
IDS = ["img0", "img1", "img2", "img3"]
CPU = ["trainer.accelerator=cpu", "inversion.num_ddim_steps=2", "inversion.num_inner_steps=1",
       "inversion.image_size=64", "output.compute_baseline=false", "output.save_strip=false"]  # fmt: skip
LAUNCH_VARS = re.compile(r"^(SLURM_|TORCHELASTIC_|PMI_|OMPI_)|^(MASTER_ADDR|MASTER_PORT|RANK|LOCAL_RANK|WORLD_SIZE|"
                         r"LOCAL_WORLD_SIZE|GROUP_RANK|NODE_RANK)$")  # fmt: skip
"""A launcher's variables around pytest, kept out of the jobs started here."""

SRUN = """#!/bin/bash
# stand-in for srun: $SLURM_NTASKS copies of the command, each with its task's ids; the highest exit code
n=${SLURM_NTASKS:-1}; per=${SLURM_NTASKS_PER_NODE:-$n}; pids=()
for ((r = 0; r < n; r++)); do
    SLURM_PROCID=$r SLURM_LOCALID=$((r % per)) SLURM_NODEID=$((r / per)) "$@" &
    pids+=($!)
done
code=0
for p in "${pids[@]}"; do
    wait "$p" && c=0 || c=$?
    ((c > code)) && code=$c
done
exit $code
"""
SCONTROL = """#!/bin/bash
echo "$@" >> "$SCONTROL_LOG"
"""

pytestmark = pytest.mark.slow  # multi-process: CI runs them (-m slow); the README test command skips them


@pytest.fixture(scope="module")
def dataset(noise_dataset):
    return noise_dataset


@pytest.fixture
def standins(tmp_path) -> Path:
    """A bin folder with the srun and scontrol stand-ins, and the log scontrol appends to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _env(standins: Path, **slurm) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not LAUNCH_VARS.match(k)}
    path = os.pathsep.join([str(standins), str(Path(sys.executable).parent), env.get("PATH", "")])  # nti, srun
    return {**env, "PATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "SCONTROL_LOG": str(standins / "scontrol.log"), **slurm}  # fmt: skip


def _submit(template: str, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(["bash", str(SLURM / template), *args], cwd=log.parent, env=env, stdout=f,
                                stderr=subprocess.STDOUT)  # fmt: skip


def _wait(p: subprocess.Popen, log: Path, timeout: float = 400) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")


def assert_every_image_done_once(out: Path) -> None:
    """Every image has exactly one manifest record, "ok", and its inversion file exists."""
    records = [json.loads(line) for p in out.glob("manifest*.jsonl") for line in p.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == IDS, records
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    assert all((out / r["paths"]["inversion"]).is_file() for r in records)


def _free_job_id() -> str:
    """A job id whose port (Lightning: 15000 + its last 4 digits) is free here."""
    for _ in range(100):
        job = random.randrange(1000, 9999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 15000 + job))
            except OSError:
                continue
        return f"77{job}"
    pytest.skip("no free port in 15000-24999")


def test_invert_array_template_two_tasks(dataset, model_dir, standins, tmp_path):
    out = tmp_path / "out"
    args = [str(dataset), str(dataset / "captions.jsonl"), str(out), f"model.spec={model_dir}", *CPU]
    common = {"SLURM_ARRAY_JOB_ID": "5100", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0",
              "SLURM_ARRAY_TASK_MAX": "1", "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1",
              "SLURM_JOB_NAME": "nti-invert-array", "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost",
              "SLURM_SUBMIT_DIR": str(tmp_path)}  # fmt: skip
    logs = [tmp_path / f"task{k}.log" for k in (0, 1)]
    tasks = [
        _submit("invert_array.sbatch", args,
                _env(standins, **common, SLURM_ARRAY_TASK_ID=str(k), SLURM_JOB_ID=str(5101 + k)), logs[k])
        for k in (0, 1)
    ]  # fmt: skip
    for p, log in zip(tasks, logs):
        assert _wait(p, log) == 0, log.read_text()[-3000:]
    assert_every_image_done_once(out)
    assert all(not r.startswith("img") for r in os.listdir(out))  # output.subdirs=true: ab/<id>/ buckets
    assert not (standins / "scontrol.log").exists()  # no signal: no requeue


def test_invert_multinode_template_one_node_two_tasks(dataset, model_dir, standins, tmp_path):
    out = tmp_path / "out"
    args = [str(dataset), str(dataset / "captions.jsonl"), str(out), f"model.spec={model_dir}", *CPU,
            "trainer.ddp_timeout_s=120"]  # fmt: skip
    slurm = {"SLURM_JOB_ID": _free_job_id(), "SLURM_JOB_NAME": "nti-invert", "SLURM_NNODES": "1",
             "SLURM_NTASKS_PER_NODE": "2", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost",
             "SLURM_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(tmp_path)}  # fmt: skip
    log = tmp_path / "job.log"
    job = _submit("invert_multinode.sbatch", args, _env(standins, **slurm), log)
    assert _wait(job, log) == 0, log.read_text()[-3000:]
    assert_every_image_done_once(out)
    assert not (standins / "scontrol.log").exists()


def test_srun_standin_gives_each_task_its_ids_and_the_highest_code(standins, tmp_path):
    """The stand-in behaves as the tests above assume."""
    script = 'echo "$SLURM_PROCID $SLURM_LOCALID $SLURM_NODEID" >> ids.txt; exit $((SLURM_PROCID * 3))'
    env = _env(standins, SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="2")
    code = subprocess.run(["srun", "bash", "-c", script], cwd=tmp_path, env=env).returncode
    assert code == 9
    assert sorted((tmp_path / "ids.txt").read_text().splitlines()) == ["0 0 0", "1 1 0", "2 0 1", "3 1 1"]
