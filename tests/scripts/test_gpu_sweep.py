"""scripts/gpu_sweep.py: ``--quick`` runs every step on the CPU and writes one JSON of the documented shape."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("nti_gpu_sweep_script", ROOT / "scripts" / "gpu_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_sweep_writes_the_report(tmp_path, one_thread):
    out = tmp_path / "sweep.json"
    assert _script().main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("machine", "flops", "configs", "validation", "early_stop", "agreement", "targets", "skipped"):
        assert key in report, key
    assert report["errors"] == []
    assert {"torch", "cuda", "device"} <= set(report["machine"]) and 0 < report["wall_s"] < 120
    assert report["flops"]["forward_backward"] > report["flops"]["forward"] > 0
    grid = {(c["precision"], c["batch_size"]) for c in report["configs"] if c["status"] == "ok"}
    assert grid == {("32-true", 1), ("32-true", 2), ("bf16-mixed", 1), ("bf16-mixed", 2)}
    for c in report["configs"]:
        assert c["grad_call_s"] > 0 and c["no_grad_call_s"] > 0 and c["s_per_image_early_stop"] > 0
        assert c["s_per_image_worst"] >= c["admit_s_per_image"] and c["unet_tflops_worst"] > 0
    v = report["validation"]
    assert v["early_stop"] is False and v["inner_steps_per_image"] == report["T"] * report["N"]
    assert v["calls"]["grad"] == v["predicted_calls"]["grad"] and v["measured_over_predicted"] > 0
    a = report["agreement"]  # real numbers from two inversions (here both on the CPU)
    assert all(math.isfinite(p) and p > 5 for p in a["psnr_db_cpu"] + a["psnr_db_device"])
    assert math.isfinite(a["max_abs_dz_T"]) and a["passed"] is True
    assert {"s_per_image_worst", "images_per_hour_worst", "largest_batch_in_80gb"} <= set(report["targets"])
    assert report["targets"]["meaningful"] is False
    assert any(s["what"] == "torch.compile" for s in report["skipped"])


def test_budget_skips_are_recorded(tmp_path, one_thread):
    out = tmp_path / "sweep.json"
    _script().main(["--quick", "--budget-s", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["configs"] == [] and report["agreement"] is None and report["validation"] is None
    assert sum("budget" in s["reason"] for s in report["skipped"]) >= 5
    assert report["targets"]["s_per_image_worst"]["met"] is None


def test_unknown_family_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        _script().parse_args(["--family", "sd3"])
    assert "--family 'sd3' is not known yet; this script knows: sd15, sdxl" in capsys.readouterr().err
