"""``scripts/slurm/submitit_launch.py`` through submitit's LocalExecutor (``--executor local``): 2 shards as local
processes on CPU, the embedded tiny model at T = 2, every bundled sample done once across both shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("submitit")  # the slurm extra (in the test extra)

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "nti_lightning" / "assets" / "samples"
CPU = ["trainer.accelerator=cpu", "model.spec=tiny", "inversion.num_ddim_steps=2", "inversion.num_inner_steps=1",
       "inversion.image_size=64", "output.compute_baseline=false", "output.save_strip=false"]  # fmt: skip


@pytest.mark.slow  # two local jobs of nti invert (~40 s here)
def test_two_shards_through_the_local_executor(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "slurm" / "submitit_launch.py"), "--executor", "local",
           "--images", str(SAMPLES), "--captions", str(SAMPLES / "captions.jsonl"), "--output", str(out),
           "--shards", "2", "--logs", str(tmp_path / "logs"), *CPU]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(cmd, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=500)  # fmt: skip
    assert done.returncode == 0, (
        done.stdout + done.stderr + "".join(p.read_text() for p in (tmp_path / "logs").glob("*.err"))
    )
    assert "submitted 2 tasks" in done.stdout and "exit codes of the tasks: [0, 0]" in done.stdout
    per_file = {p.name: [json.loads(x) for x in p.read_text().splitlines()] for p in out.glob("manifest*.jsonl")}
    records = [r for recs in per_file.values() for r in recs]
    assert sorted(r["id"] for r in records) == ["astronaut", "cat", "coffee"]  # each image once
    assert all(r["status"] == "ok" and (out / r["paths"]["inversion"]).is_file() for r in records)
    assert sum(1 for recs in per_file.values() if recs) == 2  # both shards inverted their share
