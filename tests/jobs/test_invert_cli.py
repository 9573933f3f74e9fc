"""Hard to misuse: one run per folder, exit codes, one-line errors, Ctrl-C, a light CLI, readable files."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nti_lightning.cli import EXIT_ALL_FAILED, EXIT_CONFIG_ERROR, EXIT_INTERRUPTED, EXIT_SOME_FAILED, main
from nti_lightning.jobs.invert import InvertWorker
from nti_lightning.store.files import HOST

ROOT = Path(__file__).resolve().parents[2]
IDS = ["img0", "img1", "img2"]
FAST = ["inversion.num_ddim_steps=2", "inversion.num_inner_steps=1", "inversion.image_size=64",
        "inversion.batch_size=2", "output.compute_baseline=false", "output.save_strip=false",
        "trainer.accelerator=cpu"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(data, out, model_dir, *extra):
    return ["invert", "--images", str(data), "--captions", str(data / "captions.jsonl"), "--output", str(out),
            f"model.spec={model_dir}", "--quiet", *FAST, *extra]  # fmt: skip


def test_a_second_run_on_a_locked_folder_is_refused(noise_dataset, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "locks").mkdir(parents=True)
        (out / "locks" / "shard0.lock").write_text(json.dumps({"host": HOST, "pid": holder.pid, "started": "x"}))
        assert main(_args(noise_dataset, out, model_dir)) == EXIT_CONFIG_ERROR
        err = capsys.readouterr().err
        assert "in use by another run" in err and str(holder.pid) in err and "Traceback" not in err
        assert not list(out.glob("manifest*.jsonl"))  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over, and released at the end
    assert main(_args(noise_dataset, out, model_dir)) == 0
    assert "took over the claim" in (out / "logs" / "rank0.log").read_text()
    assert not list((out / "locks").glob("*.lock"))


def test_every_image_failed_exits_4(noise_dataset, model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(_args(noise_dataset, out, model_dir, "inversion.guidance_scale=1e30")) == EXIT_ALL_FAILED  # non-finite
    assert {r["status"] for r in _manifest(out)} == {"failed"}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    (bad / "captions.jsonl").write_text('{"image": "a.png", "prompt": "x"}\n')
    assert main(_args(bad, tmp_path / "out2", model_dir)) == EXIT_ALL_FAILED


def test_user_mistakes_are_one_line_with_exit_2(noise_dataset, model_dir, tmp_path, capsys):
    cases = [
        _args(tmp_path / "missing", tmp_path / "o1", model_dir),  # input path that does not exist
        _args(noise_dataset, tmp_path / "o2", tmp_path / "no-model"),  # model path that does not exist
        _args(noise_dataset, tmp_path / "o3", model_dir, "inversion.learning_rate=-1"),  # out of range
        _args(noise_dataset, tmp_path / "o4", model_dir, "inversion.guidance_scale=high"),  # wrong type
    ]
    for argv in cases:
        assert main(argv) == EXIT_CONFIG_ERROR, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_ctrl_c_saves_and_exits_130_then_resumes(noise_dataset, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = InvertWorker.on_event

    def on_event(self, event):
        if getattr(event, "number", None) == 3:
            self.stop.signum = signal.SIGINT  # what the handler sets on Ctrl-C
        return real(self, event)

    with monkeypatch.context() as m:
        m.setattr(InvertWorker, "on_event", on_event)
        assert main(_args(noise_dataset, out, model_dir)) == EXIT_INTERRUPTED
    assert (out / "checkpoints" / "shard0.rank0.pt").is_file()
    assert "interrupted" in (out / "logs" / "rank0.log").read_text()
    assert main(_args(noise_dataset, out, model_dir)) == 0
    log = (out / "logs" / "rank0.log").read_text()
    n = int(re.search(r"resuming (\d+) in-flight image\(s\)", log).group(1))
    assert n >= 1 and f" {n} resumed," in log  # the summary counts the images resumed, not checkpoints


def test_the_table_names_the_method_and_records_strict_json(noise_dataset, model_dir, tmp_path, capsys):
    """For ddim the columns say ddim, not NTI; every manifest line and meta.json is strict JSON; each image's
    seconds are its share of the UNet calls (they add up to no more than the run's wall time)."""
    from nti_lightning.jobs.invert_outputs import format_header

    assert " NTI*" not in format_header("ddim") and " ddim*" in format_header("ddim") and " NTI*" in format_header()
    out = tmp_path / "out"
    t0 = time.perf_counter()
    assert main(_args(noise_dataset, out, model_dir, "inversion.method=ddim")) == 0
    wall = time.perf_counter() - t0
    assert "ddim*" in capsys.readouterr().out  # --quiet: the table printed at the end
    recs = [json.loads(x, parse_constant=pytest.fail) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["method"] for r in recs} == {"ddim"} and all("ddim_latent_mse" in r["metrics"] for r in recs)
    for r in recs:
        json.loads((out / r["paths"]["meta"]).read_text(), parse_constant=pytest.fail)
    assert 0 < sum(r["seconds"] for r in recs) <= wall


def test_outputs_are_readable_and_config_paths_absolute(noise_dataset, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(_args(noise_dataset, Path("rel-out"), model_dir)) == 0
    inv = tmp_path / "rel-out" / "images" / "img0" / "inversion.safetensors"
    umask = os.umask(0)
    os.umask(umask)
    assert inv.stat().st_mode & 0o777 == 0o666 & ~umask
    cfg = (tmp_path / "rel-out" / "config.yaml").read_text()
    assert f"dir: {tmp_path / 'rel-out'}" in cfg


def test_cli_starts_without_torch_and_has_a_version():
    code = "import sys, nti_lightning.cli as c; c.build_parser(); import nti_lightning.run.status; "
    code += "print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert res.stdout.strip() == "False", res.stderr
    res = subprocess.run([sys.executable, "-m", "nti_lightning.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("nti_lightning ")


def test_image_size_null_equals_the_size_it_resolves_to(noise_dataset, model_dir, random_model, tmp_path, capsys):
    out = tmp_path / "out"
    native = random_model.native_image_size
    base = [a for a in _args(noise_dataset, out, model_dir) if not a.startswith("inversion.image_size")]
    assert main([*base, f"inversion.image_size={native}"]) == 0
    capsys.readouterr()
    assert main([*base, "inversion.image_size=null"]) == 0  # the same run: nothing redone
    assert f"0 inverted, 0 failed, {len(IDS)} already done" in capsys.readouterr().out


def _copy_images(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in IDS:
        (dst / f"{name}.png").write_bytes((src / f"{name}.png").read_bytes())
    return dst


def _captions(folder: Path, names) -> None:
    rows = [json.dumps({"image": f"{n}.png", "prompt": f"a photo of {n}"}) for n in names]
    (folder / "captions.jsonl").write_text("".join(r + "\n" for r in rows))


def _manifest(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def test_a_fixed_caption_retries_the_failed_image(noise_dataset, model_dir, tmp_path, capsys):
    data, out = _copy_images(noise_dataset, tmp_path / "data"), tmp_path / "out"
    _captions(data, IDS[:2])  # img2 has no caption and no default prompt: it fails
    assert main(_args(data, out, model_dir)) == EXIT_SOME_FAILED
    err = capsys.readouterr().err
    assert err.count("warning: 1 of 3 images have no caption") == 1 and "'img2'" in err, err
    assert [r["status"] for r in _manifest(out) if r["id"] == "img2"] == ["failed"]
    # rerun unchanged: the failure is remembered, not redone, and the summary says so
    assert main(_args(data, out, model_dir)) == EXIT_SOME_FAILED
    res = capsys.readouterr()
    assert "3 already done (1 of them failed before)" in res.out and "--retry-failed" in res.err
    assert len(_manifest(out)) == 3
    # the caption is fixed: that image alone is retried
    _captions(data, IDS)
    assert main(_args(data, out, model_dir)) == 0
    assert "1 inverted, 0 failed, 2 already done" in capsys.readouterr().out
    recs = _manifest(out)
    assert sorted(r["id"] for r in recs) == ["img0", "img1", "img2", "img2"] and recs[-1]["id"] == "img2"
    assert recs[-1]["status"] == "ok"
    assert recs[-1]["prompt"] == "a photo of img2"


def test_captions_that_match_no_image_warn_once_with_an_example(noise_dataset, model_dir, tmp_path, capsys):
    data, out = _copy_images(noise_dataset, tmp_path / "data"), tmp_path / "out"
    _captions(data, ["other"])
    assert main(_args(data, out, model_dir, "data.default_prompt=a photo")) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1, err
    assert "none of the 1 captions" in err and "'other.png'" in err and "'img0'" in err
    assert "all get data.default_prompt ('a photo')" in err
    assert {r["prompt"] for r in _manifest(out)} == {"a photo"}


def test_caption_coverage_messages():
    from nti_lightning.data.items import CaptionIndex, caption_coverage

    empty, two = CaptionIndex(), CaptionIndex()
    two.add([("a.png", "x"), ("b.png", "y")])
    assert "has no usable rows; all 5 images get no prompt (they fail)" in caption_coverage("c.jsonl", empty, 5, 5,
                                                                                             "a", None)  # fmt: skip
    assert caption_coverage("c.jsonl", two, 5, 0, None, None) is None
    partial = caption_coverage("c.jsonl", two, 5, 3, "e", "p")
    assert partial.startswith("3 of 5 images have no caption in c.jsonl (e.g. 'e'") and "('p')" in partial


def test_ranks_whose_images_failed_still_completed(tmp_path):
    from nti_lightning.jobs.invert import summary_path
    from nti_lightning.run.folder import WorkerId
    from nti_lightning.run.launch import RankFailedError, merge_rank_summaries, settle_ranks
    from nti_lightning.run.summary import RunSummary

    (tmp_path / "logs").mkdir()
    mine = RunSummary(output=tmp_path, n_done=2)
    other = RunSummary(output=tmp_path, n_done=1, n_failed=1, rank=1, failed=[{"id": "x", "status": "failed"}])
    paths = {r: summary_path(tmp_path, WorkerId(rank=r, world=3)) for r in (1, 2)}
    other.save(paths[1])
    settle_ranks(mine, {1: EXIT_SOME_FAILED, 2: EXIT_ALL_FAILED})  # finished their shares: not an error
    with pytest.raises(RankFailedError):
        settle_ranks(mine, {1: 1})
    merge_rank_summaries(mine, paths, since=0.0)  # rank 2 left no summary
    assert (mine.n_done, mine.n_failed, mine.failed[0]["id"], mine.rank) == (3, 1, "x", 0)


def test_the_table_is_printed_once(noise_dataset, model_dir, tmp_path, capsys):
    from nti_lightning.jobs.invert_outputs import format_header

    args = [a for a in _args(noise_dataset, tmp_path / "out", model_dir) if a != "--quiet"]
    assert main([*args, "output.progress_bar=false"]) == 0
    res = capsys.readouterr()
    header = format_header()
    assert (res.err + res.out).count(header) == 1 and header in res.err  # live, as the images finish
    for name in IDS:
        assert sum(line.startswith(name) for line in (res.err + res.out).splitlines()) == 1
    assert res.out.strip().splitlines()[-1].startswith("3 inverted, 0 failed, 0 already done")


def test_more_user_mistakes_are_one_line_naming_the_culprit(noise_dataset, model_dir, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("inversion:\n  num_inner_steps: 2\n")
    cases = {
        "is a file": _args(noise_dataset, a_file, model_dir),  # --output that is a file
        "trainer.accelerator": _args(noise_dataset, tmp_path / "o1", model_dir, "trainer.accelerator=cuda"),
        "(a key=value override): imags": [
            *_args(noise_dataset, tmp_path / "o2", model_dir),
            "--config",
            str(cfg),
            "imags=x",
        ],  # fmt: skip
        f"in {cfg}": _args(noise_dataset, tmp_path / "o3", model_dir, "--config", str(cfg)),  # after the file fix
    }
    cfg_bad = cases.pop(f"in {cfg}")
    for expect, argv in cases.items():
        assert main(argv) == EXIT_CONFIG_ERROR, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and expect in err, err
    cfg.write_text("inversion:\n  num_inner_stepz: 2\n")
    assert main(cfg_bad) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert f"in {cfg}: inversion.num_inner_stepz" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:
        main(["invert", "--imags", "x"])  # a flag typo: the invert command's usage, not nti's
    assert e.value.code == 2 and "nti invert: error: unrecognized arguments: --imags" in capsys.readouterr().err


@pytest.mark.slow  # a fresh `nti` process: CI runs it (-m slow); the README test command skips it
def test_a_quiet_run_prints_no_library_notices(noise_dataset, model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    cmd = [sys.executable, "-m", "nti_lightning.cli", *_args(noise_dataset, tmp_path / "out", model_dir)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.strip() == "", res.stderr  # no torchvision / transformers / component progress notices
