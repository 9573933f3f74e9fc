"""``nti edit`` on the random tiny model: the single form (its files, the naming rule that never overwrites) and
the batch form, a job on the run layer (its folder, fixed names, resume, array tasks, hostile lines, dotlist)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from nti_lightning.cli import EXIT_CONFIG_ERROR, EXIT_PREEMPTED, EXIT_SOME_FAILED, main
from nti_lightning.edit_config import EDIT_DEFAULTS
from nti_lightning.jobs.edit import EditWorker
from nti_lightning.p2p import cli
from nti_lightning.store.files import HOST
from nti_lightning.store.inversion import save_inversion

from .helpers import DOG, SOURCE, make_inversion

STEM = "a_dog_sitting_next_to_a_mirror"
CPU = ["trainer.accelerator=cpu"]


@pytest.fixture
def folder(model, tmp_path, monkeypatch):
    """An `nti invert`-like output folder (images/<id>/, a manifest) with two inversions; `nti edit` gets the
    random model."""
    monkeypatch.setattr(cli, "load_model_for", lambda inv, spec, device, config_dir=None: model)
    out = tmp_path / "out"
    lines = []
    for image_id, prompt, seed in (("cat", SOURCE, 0), ("car", "a red car on a road", 1)):
        rel = f"images/{image_id}/inversion.safetensors"
        save_inversion(out / rel, make_inversion(model, prompt, seed=seed))
        lines.append({"id": image_id, "status": "ok", "paths": {"inversion": rel}, "finished_at": time.time()})
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return out


def edit_cat(folder, *extra) -> int:
    return main(["edit", str(folder / "images" / "cat" / "inversion.safetensors"), "--target", DOG, *extra])


def write_edits(folder, lines) -> str:
    path = folder.parent / "edits.jsonl"
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return str(path)


def run_batch(folder, lines, *extra, code=0) -> list[dict]:
    assert main(["edit", str(folder), "--edits", write_edits(folder, lines), *CPU, *extra]) == code
    return [json.loads(x) for x in (folder / "edits" / "results.jsonl").read_text().splitlines()]


def test_cli_single_and_batch(folder):
    assert edit_cat(folder, "--blend", "cat", "dog", "--cross-replace", "0.6", "dog=0.3", "--attention") == 0
    edits = folder / "images" / "cat" / "edits"
    strip = Image.open(edits / f"{STEM}_strip.png")
    assert strip.width == 3 * 64 + 2 * 4 and strip.height > 64  # input | reconstruction | edit, under labels
    edit = Image.open(edits / f"{STEM}.png")
    band = strip.height - 64
    assert strip.crop((2 * 68, band, 2 * 68 + 64, band + 64)).tobytes() == edit.tobytes()
    assert (edits / f"{STEM}_attention.png").is_file()

    lines = [
        {"image_id": "cat", "target": DOG, "blend": ["cat", "dog"]},
        {"image_id": "cat", "target": "a cat sitting next to a silver mirror", "mode": "refine"},
        {"image_id": "cat", "target": SOURCE, "reweight": {"cat": 2}},
        {"image_id": "cat", "target": DOG, "blend": ["horse"]},  # word not there
        {"image_id": "car", "target": "a blue car on a road", "cross_replace": {"default": 0.8, "blue": 0.2}},
        {"image_id": "car", "target": "a car", "mode": "replace"},  # cannot be aligned
        {"image_id": "nope", "target": "a dog"},  # no such image
        {"image_id": "car", "target": "a blue car", "colour": 1},  # unknown field
        "{not json",
        {"image_id": "car", "target": "a blue car", "mode": "swap"},  # no such mode
    ]
    results = run_batch(folder, lines, "--batch-size", "2", code=EXIT_SOME_FAILED)
    status = {r["line"]: r["status"] for r in results}
    assert status == {1: "ok", 2: "ok", 3: "ok", 4: "failed", 5: "ok", 6: "failed", 7: "failed", 8: "failed",
                      9: "failed", 10: "failed"}  # fmt: skip
    by_line = {r["line"]: r for r in results}
    assert by_line[1]["mode"] == "replace" and by_line[2]["mode"] == "refine" and by_line[3]["mode"] == "reweight"
    assert "horse" in by_line[4]["error"] and "same number of words" in by_line[6]["error"]
    assert "'nope' is not among the images" in by_line[7]["error"] and "fix the id" in by_line[7]["error"]
    assert "unknown field" in by_line[8]["error"] and "JSON" in by_line[9]["error"]
    assert "unknown edit mode 'swap'" in by_line[10]["error"]
    for line in (1, 2, 3, 5):
        paths = by_line[line]["paths"]
        assert sorted(paths) == ["edit", "settings", "strip"]  # no --attention: no attention map
        assert paths["edit"].startswith(f"edits/images/{by_line[line]['image_id']}/{line:04d}_")
        for path in paths.values():
            assert (folder / path).is_file()
    job = folder / "edits"
    assert json.loads((job / "run.json").read_text())["job"] == "edit" and (job / "config.yaml").is_file()
    assert not list(job.glob("locks/*.lock"))  # released
    assert main(["status", str(job)]) == 0


def test_each_edit_saves_its_resolved_settings(folder):
    assert edit_cat(folder, "--cross-replace", "dog=0.3", "--attention") == 0
    record = json.loads((folder / "images" / "cat" / "edits" / f"{STEM}.json").read_text())
    assert record["source_prompt"] == SOURCE and record["target"] == DOG
    assert record["inversion"] == str((folder / "images" / "cat" / "inversion.safetensors").resolve())
    assert record["config"] == {
        **EDIT_DEFAULTS.to_dict(),
        "mode": "replace",  # inferred
        "guidance_scale": 7.5,  # the inversion's
        "cross_replace": {"default_": EDIT_DEFAULTS.cross_replace, "dog": 0.3},
        "attention": True,
    }
    assert record["files"] == {
        "edit": f"{STEM}.png",
        "strip": f"{STEM}_strip.png",
        "attention": f"{STEM}_attention.png",
        "settings": f"{STEM}.json",
    }


def test_reruns_never_overwrite_or_leave_a_stale_attention_map(folder):
    edits = folder / "images" / "cat" / "edits"
    assert edit_cat(folder, "--attention") == 0
    first = {p.name: p.read_bytes() for p in edits.iterdir()}
    assert edit_cat(folder, "--self-replace", "0.0") == 0  # another edit, same name, no attention map
    assert {p.name: p.read_bytes() for p in edits.iterdir() if p.name in first} == first
    assert sorted(set(p.name for p in edits.iterdir()) - set(first)) == [
        f"{STEM}-2.json",
        f"{STEM}-2.png",
        f"{STEM}-2_strip.png",
    ]
    assert json.loads((edits / f"{STEM}-2.json").read_text())["config"]["self_replace"] == 0.0
    second = (edits / f"{STEM}-2.png").read_bytes()
    assert second != first[f"{STEM}.png"]  # the settings differ, so do the pictures
    assert edit_cat(folder, "edit.self_replace=0.0", "--overwrite") == 0  # replaces the first edit, all of it
    assert not (edits / f"{STEM}_attention.png").exists()
    assert (edits / f"{STEM}.png").read_bytes() == second  # the new edit under the first one's name
    assert json.loads((edits / f"{STEM}.json").read_text())["config"]["overwrite"] is True
    assert (edits / f"{STEM}-2.png").read_bytes() == second  # the other edit untouched


def test_batch_reruns_keep_their_names_and_redo_only_what_changed(folder, capsys):
    lines = [{"image_id": "cat", "target": DOG}, {"image_id": "car", "target": "a blue car on a road"}]
    first = run_batch(folder, lines, "--attention")
    assert first[0]["paths"]["edit"] == f"edits/images/cat/0001_{STEM}.png"
    assert (folder / first[0]["paths"]["attention"]).is_file()
    capsys.readouterr()
    assert run_batch(folder, lines, "--attention") == first  # nothing to do: the same records
    assert "0 edited, 0 failed, 2 already done" in capsys.readouterr().out
    lines[1]["self_replace"] = 0.0  # a changed line is redone
    again = run_batch(folder, lines, "--attention")
    assert again[0] == first[0] and again[1]["id"] != first[1]["id"] and again[1]["paths"] == first[1]["paths"]
    assert "1 edited, 0 failed, 1 already done" in capsys.readouterr().out
    third = run_batch(folder, lines)  # other settings: every line redone, into the same names
    assert [r["paths"]["edit"] for r in third] == [r["paths"]["edit"] for r in first]
    names = sorted(p.name for p in (folder / "edits" / "images" / "cat").iterdir())
    assert names == [f"0001_{STEM}.json", f"0001_{STEM}.png", f"0001_{STEM}_strip.png"]  # no -2, no stale map
    assert run_batch(folder, lines, "--overwrite")[0]["finished_at"] > third[0]["finished_at"]  # all redone


def test_command_line_settings_are_every_line_s_defaults(folder):
    lines = [
        {"image_id": "cat", "target": DOG},
        {"image_id": "cat", "target": DOG, "cross_replace": 0.25, "self_replace": [0.0, 0.5], "guidance_scale": 3},
    ]
    results = run_batch(folder, lines, "--cross-replace", "0.5", "edit.self_replace=0.25", "--guidance-scale", "5")
    configs = [json.loads((folder / r["paths"]["settings"]).read_text())["config"] for r in results]
    assert [(c["cross_replace"], c["self_replace"], c["guidance_scale"]) for c in configs] == [
        (0.5, 0.25, 5.0),
        (0.25, [0.0, 0.5], 3.0),
    ]
    assert "self_replace: 0.25" in (folder / "edits" / "config.yaml").read_text()


def test_bad_settings_are_one_line_naming_the_key(folder, capsys):
    edits = write_edits(folder, [{"image_id": "cat", "target": DOG}])
    assert main(["edit", str(folder), "--edits", edits, "--blend", "cat"]) == EXIT_CONFIG_ERROR
    assert '"blend"/"reweight" per line' in capsys.readouterr().err
    assert main(["edit", str(folder), "--edits", edits, "edit.batch_sise=2"]) == EXIT_CONFIG_ERROR
    assert "edit.batch_sise" in capsys.readouterr().err
    assert main(["edit", str(folder), "--edits", edits, "output.folder=../x"]) == EXIT_CONFIG_ERROR
    assert "starting with 'edits'" in capsys.readouterr().err
    assert not (folder / "edits").exists()


def test_a_second_run_on_a_job_folder_in_use_is_refused(folder, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / "edits" / "locks").mkdir(parents=True)
        lock = {"host": HOST, "pid": holder.pid, "started": "x"}
        (folder / "edits" / "locks" / "shard0.lock").write_text(json.dumps(lock))
        edits = write_edits(folder, [{"image_id": "cat", "target": DOG}])
        assert main(["edit", str(folder), "--edits", edits, *CPU]) == EXIT_CONFIG_ERROR
        assert "in use by another run" in capsys.readouterr().err
        assert not list((folder / "edits").glob("manifest*")) and not (folder / "edits" / "images").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stop_loses_nothing_done_and_a_rerun_does_the_rest(folder, monkeypatch, capsys):
    lines = [{"image_id": i, "target": t} for i, t in [("cat", DOG), ("car", "a blue car on a road")] * 2]
    real = EditWorker.record

    def record(self, line, status, **fields):
        real(self, line, status, **fields)
        self.stop.signum = signal.SIGTERM  # the job stops before its next pass

    with monkeypatch.context() as m:
        m.setattr(EditWorker, "record", record)
        first = run_batch(folder, lines, "--batch-size", "1", code=EXIT_PREEMPTED)
    assert [r["status"] for r in first] == ["ok", "pending", "pending", "pending"]
    capsys.readouterr()
    results = run_batch(folder, lines, "--batch-size", "1")
    assert "3 edited, 0 failed, 1 already done" in capsys.readouterr().out
    assert results[0] == first[0] and [r["status"] for r in results] == ["ok"] * 4


def test_two_array_tasks_split_the_lines(folder):
    lines = [{"image_id": i, "target": t} for i, t in [("cat", DOG), ("car", "a blue car on a road")] * 2]
    for shard in (0, 1):
        results = run_batch(folder, lines, f"data.shard_index={shard}", "data.num_shards=2")
    job = folder / "edits"
    m0 = [json.loads(x)["line"] for x in (job / "manifest.shard0.rank0.jsonl").read_text().splitlines()]
    m1 = [json.loads(x)["line"] for x in (job / "manifest.shard1.rank0.jsonl").read_text().splitlines()]
    assert sorted(m0) == [1, 3] and sorted(m1) == [2, 4]
    assert [r["status"] for r in results] == ["ok"] * 4 and [r["shard"] for r in results] == [0, 1, 0, 1]


def test_hostile_lines_fail_alone_and_nothing_is_written_outside(folder, model, tmp_path):
    outside = folder.parent / "x"
    outside.mkdir()
    save_inversion(outside / "inversion.safetensors", make_inversion(model, SOURCE))
    lines = [
        {"image_id": "../../x", "target": DOG},
        {"image_id": "cat/../../x", "target": DOG},
        {"inversion": "../x/inversion.safetensors", "target": DOG},
        {"inversion": str(outside / "inversion.safetensors"), "target": DOG},
        {"image_id": "cat", "target": DOG},
    ]
    edits = write_edits(folder, lines)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "out" not in p.parts)
    assert main(["edit", str(folder), "--edits", edits, *CPU]) == EXIT_SOME_FAILED
    results = [json.loads(x) for x in (folder / "edits" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in results] == ["failed"] * 4 + ["ok"]
    for r in results[:2]:
        assert "is not an image id" in r["error"] and "give the id as `nti invert` recorded it" in r["error"]
    for r in results[2:4]:
        assert "is outside the output folder" in r["error"] and "give a path inside it" in r["error"]
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "out" not in p.parts)
    assert after == before and sorted(p.name for p in folder.iterdir()) == ["edits", "images", "manifest.jsonl"]
    assert not (folder / "images" / "cat" / "edits").exists()  # the batch form writes only into its folder


@pytest.mark.slow  # multi-process: CI runs it (-m slow); the README test command skips it
def test_two_ranks_split_the_lines(model_dir, tmp_path):
    from nti_lightning.models import load_model

    model = load_model(str(model_dir), device="cpu")  # the record names this folder: the ranks load it
    out = tmp_path / "out"
    rel = "images/cat/inversion.safetensors"
    save_inversion(out / rel, make_inversion(model, SOURCE))
    (out / "manifest.jsonl").write_text(json.dumps({"id": "cat", "status": "ok", "paths": {"inversion": rel}}) + "\n")
    edits = write_edits(out, [{"image_id": "cat", "target": t} for t in (DOG, SOURCE, DOG, SOURCE)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nti_lightning.cli", "edit", str(out), "--edits", edits, *CPU, "trainer.devices=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = out / "edits"
    m0 = [json.loads(x)["line"] for x in (job / "manifest.rank0.jsonl").read_text().splitlines()]
    m1 = [json.loads(x)["line"] for x in (job / "manifest.rank1.jsonl").read_text().splitlines()]
    assert sorted(m0) == [1, 3] and sorted(m1) == [2, 4]
    assert proc.stdout.count(" edited, ") == 1 and "4 edited, 0 failed" in proc.stdout  # one report of the run
    results = [json.loads(x) for x in (job / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in results] == ["ok"] * 4 and [r["rank"] for r in results] == [0, 1, 0, 1]
