"""A kill -9 at every write point of ``nti invert``, then a rerun: the results are bit-identical to an
uninterrupted run and every file is valid (issue #27: "a fault-injection test at each write point").

Each case runs ``nti invert`` in a subprocess with ``NTI_FAULT=<point>@<n>`` (``nti_lightning.faults``: SIGKILL at
the n-th hit of that write point — no handler, no buffer flush), checks it died there, reruns it to the end in
this process and compares: every image's ∅_t equal to the reference's bit for bit, the failed image failed once,
strict JSON on every manifest line, whole index entries, no temporary file, checkpoint or claim left, and
``nti status`` counting what the reference counts.
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest
from run_outputs import read_nulls, spawn_invert

from nti_lightning.cli import main
from nti_lightning.exit_codes import EXIT_SOME_FAILED
from nti_lightning.run import read_manifest
from nti_lightning.run.status import status
from nti_lightning.store.records import ENTRY

IDS = ["img0", "img1", "img2"]
POINTS = [
    "claim.published@1",  # the claims: rank 0's shard claim is published first
    "claim.published@2",
    "file.written:run.json@1",  # the run's identity and config
    "file.renamed:run.json@1",
    "file.renamed:config.yaml@1",
    "file.renamed:rank0.json@1",  # progress
    "checkpoint.written@1",  # the first checkpoint (the stream's start), then later ones
    "checkpoint.renamed@1",
    "checkpoint.written@4",
    "checkpoint.renamed@6",
    "file.written:inversion.safetensors@2",  # an image's files
    "file.renamed:inversion.safetensors@2",
    "file.renamed:reconstruction.png@1",
    "file.renamed:strip.png@2",
    "file.renamed:meta.json@3",
    "record.partial@1",  # the record log: half a manifest line, a whole one, the index entry that commits it
    "record.appended@2",
    "failure.appended@1",
    "index.partial@2",
    "index.appended@3",
]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def dataset(noise_dataset, tmp_path_factory):
    """The noise images and one file that is no image (a failed record)."""
    d = tmp_path_factory.mktemp("with_bad")
    shutil.copytree(noise_dataset, d, dirs_exist_ok=True)
    (d / "broken.png").write_bytes(b"not an image")
    rows = (d / "captions.jsonl").read_text() + json.dumps({"image": "broken.png", "prompt": "x"}) + "\n"
    (d / "captions.jsonl").write_text(rows)
    return d


def _args(dataset, out, model_dir):
    from run_outputs import invert_args

    return invert_args(dataset, out, model_dir, "output.checkpoint_every_s=0", "output.save_strip=true")


@pytest.fixture(scope="module")
def reference(dataset, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(_args(dataset, out, model_dir)) == EXIT_SOME_FAILED
    return read_nulls(out), status(out)


def _assert_valid_and_equal(out, reference) -> None:
    nulls, ref_status = reference
    got = read_nulls(out)
    assert sorted(got) == IDS and all((got[k] == nulls[k]).all() for k in IDS)
    for p in out.glob("manifest*.jsonl"):
        for line in p.read_text().splitlines():
            json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c} in {p}"))
    for p in (out / ".nti" / "index").glob("*.idx"):
        assert p.stat().st_size % ENTRY.itemsize == 0
    recs = read_manifest(out)
    assert recs["broken"]["status"] == "failed" and sorted(k for k in recs if k != "broken") == IDS
    lines = [json.loads(x)["id"] for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(lines.count(k) <= 2 for k in set(lines))  # a line whose index entry was lost: redone, once
    assert not list(out.rglob("*.tmp")) and not list((out / "checkpoints").glob("*.pt"))
    assert not list((out / "locks").glob("*.lock"))
    s = status(out)
    assert (s["done"], s["n_failed"], s["pending"]) == (ref_status["done"], ref_status["n_failed"], 0)


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_a_write_point_then_rerun(dataset, model_dir, reference, tmp_path, point):
    out = tmp_path / "out"
    proc = spawn_invert(dataset, out, model_dir, "output.checkpoint_every_s=0", "output.save_strip=true",
                        env={"NTI_FAULT": point})  # fmt: skip
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"{point}: the run was not killed there\n{log[-3000:]}"
    assert main(_args(dataset, out, model_dir)) == EXIT_SOME_FAILED
    _assert_valid_and_equal(out, reference)
