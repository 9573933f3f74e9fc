"""`nti invert` into ``output.layout=shards`` end to end on the tiny model: tar shards and a Parquet file in,
WebDataset tar shards out; `nti.open_run` gives back every inversion (matching the folders layout bit for bit
with the same codec); a kill mid-shard resumes bit-identically with a valid tar; two array tasks split the input
shards and each opens only its own; a wholly done input shard is not opened again; `nti status` per worker and
input shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # the shard builders of tests/data
from shard_files import hf_rows, img2dataset_shard, write_parquet  # noqa: E402

import nti_lightning as nti  # noqa: E402
from nti_lightning import faults  # noqa: E402
from nti_lightning.cli import EXIT_SOME_FAILED, main  # noqa: E402
from nti_lightning.run import read_manifest  # noqa: E402
from nti_lightning.run import share as share_mod  # noqa: E402

FAST = ["inversion.num_ddim_steps=3", "inversion.num_inner_steps=2", "inversion.image_size=64",
        "inversion.batch_size=1", "output.compute_baseline=false", "output.save_strip=false",
        "output.checkpoint_every_s=0", "trainer.accelerator=cpu", "output.codec=fp32-delta-zstd",
        "output.sample_images=2", "--quiet"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """3 img2dataset tar shards (2 + 2 + 1 samples) and a Parquet file of 3 rows in 2 row groups, one row
    without caption. Returns (tar folder, parquet path, {id: status})."""
    root = tmp_path_factory.mktemp("inputs")
    d = root / "tars"
    d.mkdir()
    good = {**img2dataset_shard(d, 0, 2), **img2dataset_shard(d, 1, 2), **img2dataset_shard(d, 2, 1)}
    pq_path = root / "train-00000-of-00001.parquet"
    write_parquet(pq_path, {"image": hf_rows(3, seed=50), "text": ["a red square", None, "a blue one"]},
                  row_group_size=2)  # fmt: skip
    expected = {f"{k[:5]}/{k}": "ok" for k in good}
    expected |= {f"{pq_path.stem}/{i}": s for i, s in enumerate(["ok", "failed", "ok"])}
    return d, pq_path, expected


def _args(inp, out, model_dir, *extra):
    return ["invert", "--images", *map(str, inp), "--output", str(out), f"model.spec={model_dir}", *FAST, *extra]


def _nulls(out) -> dict[str, torch.Tensor]:
    return {k: inv.null_embeddings for k, inv in nti.open_run(out).items()}


@pytest.fixture(scope="module")
def reference(inputs, model_dir, tmp_path_factory):
    """The tars and the Parquet file inverted uninterrupted into the shards layout (and into folders)."""
    d, pq_path, _ = inputs
    out = tmp_path_factory.mktemp("ref") / "shards"
    assert main(_args([d, pq_path], out, model_dir, "output.layout=shards")) == EXIT_SOME_FAILED
    folders = out.parent / "folders"
    assert main(_args([d, pq_path], folders, model_dir, "output.layout=folders")) == EXIT_SOME_FAILED
    return out, folders


class Spy:
    """Records which input shards a run counts (``shard_size``) and opens (``iter_shard``)."""

    def __init__(self, monkeypatch) -> None:
        self.counted, self.opened = [], []
        real_size, real_iter = share_mod.shard_io.shard_size, share_mod.shard_io.iter_shard
        monkeypatch.setattr(share_mod.shard_io, "shard_size", lambda ref: self.counted.append(ref) or real_size(ref))
        monkeypatch.setattr(share_mod.shard_io, "iter_shard",
                            lambda ref, *a, **k: self.opened.append(ref) or real_iter(ref, *a, **k))  # fmt: skip

    @staticmethod
    def names(refs) -> list[str]:
        return [r.name if r.row_group is None else f"{r.name}#{r.row_group}" for r in refs]


def test_tar_shards_and_parquet_into_the_shards_layout(inputs, reference):
    _, _, expected = inputs
    out, folders = reference
    assert {k: r["status"] for k, r in read_manifest(out).items()} == expected
    ok = sorted(k for k, s in expected.items() if s == "ok")
    # every file of the layout: one finished shard with its index, PNGs for the first 2 images, no image folders
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert shards == ["rank0-000000.index.json", "rank0-000000.tar"] and not (out / "images").exists()
    assert len(list((out / "samples" / "rank0" / "first").glob("*.reconstruction.png"))) == 2
    tar_path = out / "shards" / "rank0-000000.tar"
    with tarfile.open(tar_path) as tar:  # a valid tar of <key>.inversion.safetensors + <key>.json records
        names = tar.getnames()
    assert len(names) == 2 * len(ok) and all(n.endswith((".inversion.safetensors", ".json")) for n in names)
    samples = list(wds.WebDataset(str(tar_path), shardshuffle=False))
    assert sorted(json.loads(s["json"])["id"] for s in samples) == ok
    rec = read_manifest(out)[ok[0]]
    assert rec["paths"]["shard"] == "shards/rank0-000000.tar" and isinstance(rec["paths"]["offset"], int)
    # open_run gives back every inversion, identical to the folders layout's (same codec)
    run = nti.open_run(out)
    assert len(run) == len(ok) and sorted(run) == ok and ok[0] in run and "nope" not in run
    ref = nti.open_run(folders)
    assert sorted(ref) == ok
    for k in ok:
        assert torch.equal(run[k].null_embeddings, ref[k].null_embeddings), k
        assert torch.equal(run[k].z_T, ref[k].z_T) and run[k].meta["image"]["id"] == k
    loader = torch.utils.data.DataLoader(run.as_dataset(), batch_size=3, num_workers=2)  # forked workers: own files
    batches = list(loader)
    assert sum(len(b["id"]) for b in batches) == len(ok)
    assert torch.equal(batches[0]["null_embeddings"][0], run[batches[0]["id"][0]].null_embeddings)


def test_reconstruct_from_open_run_matches_the_folders_layout(inputs, tiny_model, tmp_path):
    """On the trained tiny model: a shards-layout record reconstructs bit for bit as the folders layout's with
    the same (default, bf16) codec, and within the codec's measured loss (< 0.01 dB of reconstruction PSNR,
    docs/storage.md) of the exact codec's."""
    import numpy as np

    from nti_lightning.data.image import prepare_image

    d, _, _ = inputs
    fast = [x for x in FAST if not x.startswith("output.codec")]
    runs = {"shards": ["output.layout=shards"], "folders": ["output.layout=folders"],
            "exact": ["output.layout=folders", "output.codec=fp32-delta-zstd"]}  # fmt: skip
    for name, extra in runs.items():
        assert main(["invert", "--images", str(d / "00001.tar"), "--output", str(tmp_path / name), *fast, *extra]) == 0
    key = "00001/000010000"
    got = {}
    for name in runs:
        run = nti.open_run(tmp_path / name)
        got[name] = np.asarray(nti.reconstruct(tiny_model, run.load(key, tiny_model)), dtype=np.float64)
    assert np.array_equal(got["shards"], got["folders"])
    with tarfile.open(d / "00001.tar") as tar:
        image = next(tar.extractfile(m).read() for m in tar if m.name.startswith("000010000.") and "json" not in
                     m.name and "txt" not in m.name)  # fmt: skip
    target = (prepare_image(image, 64).permute(1, 2, 0).numpy() + 1) * 127.5

    def psnr(x, y):
        return 10 * np.log10(255.0**2 / np.mean((x - y) ** 2))

    assert abs(psnr(got["shards"], target) - psnr(got["exact"], target)) < 0.01
    assert psnr(got["shards"], got["exact"]) > 50


def test_kill_mid_shard_then_resume_is_bit_identical(inputs, reference, model_dir, tmp_path, monkeypatch):
    """A kill after the 3rd group is appended to the shard but before it is committed (in process: the fault
    point raises where kill -9 would stop the process; the subprocess variant is the slow test below)."""
    d, pq_path, expected = inputs
    out = tmp_path / "out"
    monkeypatch.setenv("NTI_FAULT", "shard.appended@3=oserror")
    faults.reload()
    try:
        assert main(_args([d, pq_path], out, model_dir, "output.layout=shards")) != 0
    finally:
        monkeypatch.delenv("NTI_FAULT")
        faults.reload()
    part = out / "shards" / "rank0-000000.tar.part"
    assert part.is_file() and len(nti.open_run(out)) == 2  # 2 committed; the 3rd is in the part, uncommitted
    assert main(_args([d, pq_path], out, model_dir, "output.layout=shards")) == EXIT_SOME_FAILED
    assert_same_shards(out, reference[0], expected)


def assert_same_shards(out, ref_out, expected) -> None:
    ref = _nulls(ref_out)
    got = _nulls(out)
    assert sorted(got) == sorted(k for k, s in expected.items() if s == "ok")
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    ids = []
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:  # every shard a valid tar, every record once
            ids += [json.loads(tar.extractfile(m).read())["id"] for m in tar if m.name.endswith(".json")]
    assert sorted(ids) == sorted(got) and not list((out / "shards").glob("*.part"))
    assert not list((out / "checkpoints").glob("*.pt"))


@pytest.mark.slow  # a subprocess killed by SIGKILL
def test_kill_9_mid_shard_then_resume_is_bit_identical(inputs, reference, model_dir, tmp_path):
    from run_outputs import ROOT

    d, pq_path, expected = inputs
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NTI_FAULT": "shard.appended@4"}

    cmd = [sys.executable, "-m", "nti_lightning.cli", *_args([d, pq_path], out, model_dir, "output.layout=shards")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "shards" / "rank0-000000.tar.part").is_file()
    assert main(_args([d, pq_path], out, model_dir, "output.layout=shards")) == EXIT_SOME_FAILED
    assert "uncommitted byte(s)" in (out / "logs" / "rank0.log").read_text()
    assert_same_shards(out, reference[0], expected)


def test_two_array_tasks_split_the_input_shards(inputs, reference, model_dir, tmp_path, monkeypatch, capsys):
    d, pq_path, expected = inputs
    out = tmp_path / "out"
    listed = ["00000", "00001", "00002", f"{pq_path.stem}#0", f"{pq_path.stem}#1"]  # the run's input shards
    for task in (0, 1):
        spy = Spy(monkeypatch)
        code = main(_args([d, pq_path], out, model_dir, "output.layout=shards", "data.num_shards=2",
                          f"data.shard_index={task}"))  # fmt: skip
        assert code == (0 if task == 0 else EXIT_SOME_FAILED)
        mine = listed[task::2]  # input shard k → array task k mod 2
        assert Spy.names(spy.counted) == mine and Spy.names(spy.opened) == mine  # no other task's shard
        if task == 0:  # only task 0's share is known yet: the total is estimated from it
            capsys.readouterr()
            assert main(["status", str(out)]) == 0
            assert f"{out}: 4 done, 0 failed, ~4 pending of ~8" in capsys.readouterr().out
    assert_same_shards(out, reference[0], expected)
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == ["shard0.rank0-000000.tar",
                                                                      "shard1.rank0-000000.tar"]  # fmt: skip
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: 7 done, 1 failed, 0 pending of 8" in printed
    assert "shard0.rank0: 4 done, 0 failed, 0 pending of 4" in printed
    assert "shard1.rank0: 3 done, 1 failed, 0 pending of 4" in printed
    assert "input shards: 5 done, 0 partly done, 0 not started, of 5" in printed
    assert f"{pq_path.stem}#0: 1 done, 1 failed of 2 (shard1.rank0)" in printed


def test_a_wholly_done_input_shard_is_not_opened_again(inputs, model_dir, tmp_path, monkeypatch, capsys):
    d, pq_path, expected = inputs
    folder = tmp_path / "tars"
    folder.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (folder / name).write_bytes((d / name).read_bytes())
    out = tmp_path / "out"
    assert main(_args([folder], out, model_dir, "output.layout=shards")) == 0
    spy = Spy(monkeypatch)
    capsys.readouterr()
    assert main(_args([folder], out, model_dir, "output.layout=shards")) == 0
    assert spy.counted == [] and spy.opened == []  # sizes from the progress file, done counts from the index
    assert "0 inverted, 0 failed, 4 already done" in capsys.readouterr().out
    (folder / "00002.tar").write_bytes((d / "00002.tar").read_bytes())  # a new shard: only it is read
    spy = Spy(monkeypatch)
    assert main(_args([folder], out, model_dir, "output.layout=shards")) == 0
    assert Spy.names(spy.opened) == ["00002"] and "1 inverted, 0 failed, 4 already done" in capsys.readouterr().out
    assert len(nti.open_run(out)) == 5 and len(list((out / "shards").glob("*.tar"))) == 2  # a shard per run


def test_auto_layout_keeps_small_datasets_in_folders_and_is_decided_once(inputs, model_dir, tmp_path, monkeypatch):
    from nti_lightning.run import layout

    d, _, _ = inputs
    out = tmp_path / "small"
    assert main(_args([d / "00002.tar"], out, model_dir)) == 0
    assert (out / "images").is_dir() and not (out / "shards").exists()
    assert json.loads((out / ".nti" / "layout.json").read_text())["layout"] == "folders"
    monkeypatch.setattr(layout, "AUTO_SHARDS_ABOVE", 2)
    big = tmp_path / "big"
    assert main(_args([d], big, model_dir)) == 0  # 3 shards × ~1.7 images a shard > 2
    assert (big / "shards" / "rank0-000000.tar").is_file() and not (big / "images").exists()
    decided = json.loads((big / ".nti" / "layout.json").read_text())
    assert decided["layout"] == "shards" and "images > 2" in decided["why"]
