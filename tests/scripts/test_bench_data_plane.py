"""The data-plane benchmark's stand-ins plug into the real invert job: a run of the stand-in engine writes every
record of SD1.5's ∅_t and latent shapes into the shards layout, and a resume after a stop continues it."""

from __future__ import annotations

import importlib.util
import json
import signal
from pathlib import Path

import torch

import nti_lightning as nti
from nti_lightning.jobs.invert import InvertWorker

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_data_plane", ROOT / "scripts" / "bench_data_plane.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_stand_in_engine_runs_the_invert_job(tmp_path, capsys, monkeypatch):
    bench = _bench()
    inputs = bench.make_inputs(tmp_path / "in", 30, 64)
    assert sorted(p.name for p in inputs.glob("*.tar")) == ["00000.tar"]
    out = tmp_path / "out"
    argv = bench.invert_argv(inputs, out, "output.layout=shards", "inversion.image_size=64", "output.sample_images=2")
    real = InvertWorker.on_event

    def stop_once(self, event):  # a stop signal after the 80th engine call: state saved, exit "preempted"
        if getattr(event, "number", None) == 80 and not (out / "stopped").exists():
            (out / "stopped").touch()
            self.stop.signum = signal.SIGTERM
        return real(self, event)

    monkeypatch.setattr(InvertWorker, "on_event", stop_once)
    bench.child({"argv": argv, "shape": "sd15"})
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < first["done"] < 30 and (out / "checkpoints" / "shard0.rank0.pt").is_file()
    bench.child({"argv": argv, "shape": "sd15"})
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["resumed"] > 0 and first["done"] + second["done"] == 30
    run = nti.open_run(out)
    assert len(run) == 30 and len(set(run)) == 30
    inv = run["00000/000000007"]
    assert inv.null_embeddings.shape == (50, 77, 768) and inv.z_T.shape == (4, 64, 64)
    assert inv.null_embeddings.dtype == torch.float32
    assert len(list((out / "samples" / "rank0" / "first").glob("*.reconstruction.png"))) == 2
