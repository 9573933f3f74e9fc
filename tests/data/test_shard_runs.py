"""`nti invert` on dataset shards end to end: a folder of img2dataset tar shards and a Parquet file with image
bytes; bad samples failed with SHARD:KEY; a rerun skips what is done; a resume with shard samples in flight."""

import json
import signal

import pytest
from run_outputs import assert_same_as_reference, read_nulls
from shard_files import hf_rows, img2dataset_shard, write_parquet, write_tar

from nti_lightning.cli import EXIT_PREEMPTED, EXIT_SOME_FAILED, main
from nti_lightning.jobs.invert import InvertWorker as Worker
from nti_lightning.run import read_manifest
from nti_lightning.store.records import RunIndex

FAST = ["inversion.num_ddim_steps=3", "inversion.num_inner_steps=2", "inversion.image_size=64",
        "inversion.batch_size=2", "output.compute_baseline=false", "output.save_strip=false",
        "trainer.accelerator=cpu", "--quiet"]  # fmt: skip
TINY = ["inversion.num_ddim_steps=2", "inversion.num_inner_steps=1", "output.checkpoint_every_s=0"]  # the issue's

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A folder of 2 img2dataset shards (3 + 2 samples, metadata parquet beside them) and a third shard with
    a sample without image and one whose image does not decode; a Parquet file of 3 rows, one without caption.
    Returns (folder, parquet, {id: expected status})."""
    root = tmp_path_factory.mktemp("shards")
    d = root / "tars"
    d.mkdir()
    good = {**img2dataset_shard(d, 0, 3), **img2dataset_shard(d, 1, 2)}
    write_tar(d / "00002.tar", [("noimg.txt", b"a caption"), ("junk.jpg", b"not a jpeg"), ("junk.txt", b"x")])
    expected = {f"{k[:5]}/{k}": "ok" for k in good} | {"00002/noimg": "failed", "00002/junk": "failed"}
    pq_path = root / "train-00000-of-00001.parquet"
    write_parquet(pq_path, {"image": hf_rows(3, seed=50), "text": ["a red square", None, "a blue one"]},
                  row_group_size=2)  # fmt: skip
    expected |= {f"{pq_path.stem}/{i}": s for i, s in enumerate(["ok", "failed", "ok"])}
    return d, pq_path, expected


def _statuses(out) -> dict[str, str]:
    return {k: r["status"] for k, r in read_manifest(out).items()}


def _check_failures(out, d, pq_path) -> None:
    errors = {k: r.get("error") for k, r in read_manifest(out).items() if r["status"] == "failed"}
    if "00002/noimg" in errors:
        assert errors["00002/noimg"].startswith(f"{d / '00002.tar'}:noimg: no image member (found .txt)")
        assert errors["00002/junk"].startswith(f"{d / '00002.tar'}:junk: not an image Pillow can read")
    if f"{pq_path.stem}/1" in errors:
        assert errors[f"{pq_path.stem}/1"].startswith(f"{pq_path}:1: no caption (column 'text' is empty)")


def test_invert_tar_shards_and_parquet_then_rerun_skips_them(shards, model_dir, tmp_path):
    d, pq_path, expected = shards
    out = tmp_path / "out"
    args = ["invert", "--images", str(d), str(pq_path), "--output", str(out), f"model.spec={model_dir}", *FAST]
    assert main(args) == EXIT_SOME_FAILED
    assert _statuses(out) == expected
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == len(expected)  # one record per sample
    _check_failures(out, d, pq_path)
    assert sorted(read_nulls(out)) == sorted(k for k, s in expected.items() if s == "ok")
    assert (out / "images" / "00000%2F000000000").is_dir()  # <shard>/<key>, one component under images/
    index = RunIndex.load(out)  # every record, ok or failed, carries its input shard (status, resume count on it)
    sources = {}
    for item_id in expected:
        sources.setdefault(item_id.split("/")[0], set()).add(int(index.get(item_id)["source"]))
    assert all(0 not in s for s in sources.values()), sources  # (a Parquet file's unit is its row group)
    assert all(len(sources[tar]) == 1 for tar in ("00000", "00001", "00002")), sources
    assert main(args) == EXIT_SOME_FAILED  # the failed ones again counted, nothing redone
    assert len((out / "manifest.jsonl").read_text().splitlines()) == len(expected)


def test_resume_with_shard_samples_in_flight_is_bit_identical(shards, model_dir, tmp_path, monkeypatch):
    """A checkpoint holds no image bytes: the in-flight samples are read again from their shards."""
    d, pq_path, expected = shards
    pattern = str(d / "{00000..00001}.tar")

    def args(out):
        return ["invert", "--images", pattern, str(pq_path), "--output", str(out), f"model.spec={model_dir}",
                "data.default_prompt=a thing", "output.checkpoint_every_s=3600", *FAST]  # fmt: skip

    ref = tmp_path / "ref"
    assert main(args(ref)) == 0
    reference = read_nulls(ref)
    out = tmp_path / "out"
    real = Worker.on_event

    def on_event(self, event):
        if getattr(event, "number", None) == 4:
            self.stop.signum = signal.SIGTERM
        return real(self, event)

    with monkeypatch.context() as m:
        m.setattr(Worker, "on_event", on_event)
        assert main(args(out)) == EXIT_PREEMPTED
    assert (out / "checkpoints" / "shard0.rank0.pt").is_file()
    assert main(args(out)) == 0
    ids = [k for k in expected if not k.startswith("00002/")]
    assert_same_as_reference(out, reference, sorted(ids))
    assert "resuming" in (out / "logs" / "rank0.log").read_text()


@pytest.mark.parametrize("which", ["tars", "parquet"])
def test_issue_command_on_the_tiny_model(shards, tmp_path, which):
    """The issue's command, as written, on the embedded tiny model: one manifest record per sample."""
    d, pq_path, expected = shards
    inp = d if which == "tars" else pq_path
    want = {k: s for k, s in expected.items() if k.startswith(pq_path.stem) == (which == "parquet")}
    out = tmp_path / "OUT"
    assert main(["invert", "--images", str(inp), "--output", str(out), *TINY, "--quiet"]) == EXIT_SOME_FAILED
    assert _statuses(out) == want
    assert len((out / "manifest.jsonl").read_text().splitlines()) == len(want)
    _check_failures(out, d, pq_path)


def test_brace_pattern_with_a_missing_shard_is_a_config_error(shards, tmp_path, capsys):
    d, _, _ = shards
    assert main(["invert", "--images", str(d / "{00000..00005}.tar"), "--output", str(tmp_path / "o")]) == 2
    assert "3 of the 6 shards of" in capsys.readouterr().err
