"""``nti status`` on a folder that is not a run's output: exit 2 with one line (it printed "0 done" and exited 0)."""

from __future__ import annotations

import json

from nti_lightning.cli import main


def test_status_of_a_folder_that_is_not_a_run_exits_2(tmp_path, capsys):
    (tmp_path / "photo.png").write_bytes(b"not a run")
    assert main(["status", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"nti status: {tmp_path} is not the output folder of an `nti invert` run")
    assert main(["status", str(tmp_path / "missing")]) == 2
    assert "is not an output folder" in capsys.readouterr().err


def test_status_of_a_run_that_has_only_started(tmp_path, capsys):
    (tmp_path / "progress.json").write_text(json.dumps({"total": 3, "num_shards": 1, "world_size": 1}))
    assert main(["status", str(tmp_path)]) == 0
    assert "0 done, 0 failed, 3 pending of 3" in capsys.readouterr().out
