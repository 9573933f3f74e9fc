"""The record log: strict JSON lines, an index entry that commits each, torn tails cut before the next append and
skipped by readers, the latest entry of an id winning across workers."""

from __future__ import annotations

import json
import math

import numpy as np

from nti_lightning.store.records import (
    ENTRY,
    FAILED,
    OK,
    RecordLog,
    RunIndex,
    cut_torn_tail,
    dumps,
    id_key,
    iter_jsonl,
    read_index_file,
    write_legacy_index,
)


def _log(tmp_path, name="rank0", lines=None):
    sink = (lines if lines is not None else []).append
    index, failures = tmp_path / ".nti/index" / f"{name}.idx", tmp_path / ".nti/failures" / f"{name}.jsonl"
    return RecordLog(tmp_path / f"manifest.{name}.jsonl", index, failures, sink)


def _rec(i, t, status="ok", **kw):
    return {"id": i, "status": status, "finished_at": t, **kw}


def test_non_finite_numbers_are_written_as_null_with_a_flag():
    text = dumps({"psnr": math.inf, "m": {"a": -math.inf, "b": math.nan, "c": 1.5}, "l": [1.0, math.inf]})
    rec = json.loads(text)  # strict JSON: no Infinity / NaN tokens
    assert "Infinity" not in text and "NaN" not in text
    assert rec == {"psnr": None, "psnr_nonfinite": "inf", "m": {"a": None, "a_nonfinite": "-inf", "b": None,
                   "b_nonfinite": "nan", "c": 1.5}, "l": [1.0, None]}  # fmt: skip


def test_a_torn_last_line_is_cut_before_the_next_append(tmp_path):
    log = _log(tmp_path)
    log.append(_rec("a", 1.0), OK)
    with open(log.manifest, "ab") as f:
        f.write(b'{"id": "b", "sta')  # a kill half-way through the next line
    with open(log.index, "ab") as f:
        f.write(b"\x01" * 20)  # and half an entry
    lines = []
    log2 = _log(tmp_path, lines=lines)
    assert any("cut a torn last record" in x for x in lines)
    log2.append(_rec("c", 2.0), OK)
    assert [r["id"] for r in iter_jsonl(log2.manifest)] == ["a", "c"]
    assert all(json.loads(x) for x in log2.manifest.read_text().splitlines())  # valid JSONL again
    assert log2.index.stat().st_size == 2 * ENTRY.itemsize


def test_readers_survive_a_torn_tail(tmp_path):
    log = _log(tmp_path)
    log.append(_rec("a", 1.0), OK)
    with open(log.manifest, "ab") as f:
        f.write(b'{"id": "torn"')
    with open(log.index, "ab") as f:
        f.write(b"\x00" * 5)
    assert [r["id"] for r in iter_jsonl(log.manifest)] == ["a"]
    assert len(read_index_file(log.index)) == 1


def test_cut_torn_tail_of_files_without_a_newline_at_all(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"id": "x"')
    assert cut_torn_tail(p) == 10 and p.read_bytes() == b""
    p.write_bytes(b'{"id": "x"}\n')
    assert cut_torn_tail(p) == 0


def test_the_latest_entry_wins_across_workers_and_failures_are_listed(tmp_path):
    a, b = _log(tmp_path, "rank0"), _log(tmp_path, "rank1")
    a.append(_rec("x", 1.0, "failed", error="bad"), FAILED, prompt="p1")
    b.append(_rec("x", 5.0), OK, prompt="p2")
    a.append(_rec("y", 2.0, "failed", error="worse"), FAILED)
    index = RunIndex.load(tmp_path)
    assert len(index) == 2 and index.count(OK) == 1 and index.count(FAILED) == 1
    assert index.get("x")["status"] == OK and index.get("y")["status"] == FAILED and index.get("z") is None
    assert [r["id"] for r in iter_jsonl(a.failures)] == ["x", "y"]
    assert bytes(index.get("x")["key"]) == id_key("x")


def test_an_index_is_built_once_from_manifests_of_older_runs(tmp_path):
    lines = [_rec("a", 1.0), _rec("b", 2.0, "failed", error="e"), _rec("b", 3.0)]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"id": "torn')
    path = write_legacy_index(tmp_path, [tmp_path / "manifest.jsonl"])
    index = RunIndex.load(tmp_path)
    assert path.is_file() and len(index) == 2 and index.count(OK) == 2
    assert np.all(index.entries["out_shard"] == -1)
