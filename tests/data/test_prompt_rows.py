"""Captions and list-file rows whose ``prompt`` is not a string: a warning or a failed row naming the line, and
the run goes on (before: ``TypeError: unhashable type: 'dict'`` stopped the whole run with exit 1)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from nti_lightning.cli import main
from nti_lightning.data.inputs import iter_items
from nti_lightning.data.items import read_captions

FAST = ["inversion.num_ddim_steps=2", "inversion.num_inner_steps=1", "inversion.image_size=64",
        "inversion.batch_size=1", "output.compute_baseline=false", "output.save_strip=false",
        "output.checkpoint_every_s=0", "trainer.accelerator=cpu"]  # fmt: skip


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _images(folder, names):
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"{name}.png")


def test_captions_object_or_list_prompt_is_a_warning_naming_the_line(tmp_path):
    path = _rows(tmp_path / "c.jsonl", [{"image": "a.png", "prompt": {"text": "a cat"}},
                                        {"image": "b.png", "prompt": ["a", "dog"]},
                                        {"image": "c.png", "prompt": "a bird"}])  # fmt: skip
    index, warnings = read_captions(path)
    assert warnings == [
        f"{path}:1: 'prompt' is a JSON object, not a string; skipped",
        f"{path}:2: 'prompt' is a JSON list, not a string; skipped",
    ]
    assert list(index) == ["c.png"] and index["c.png"] == ["a bird"]
    _images(tmp_path, "abc")
    items = list(iter_items([str(tmp_path / f"{n}.png") for n in "abc"], index, "a default"))
    assert [(it.id, it.prompt, it.error) for it in items] == [("a", "a default", None), ("b", "a default", None),
                                                               ("c", "a bird", None)]  # fmt: skip
    index.close()


def test_list_row_prompt_not_a_string_fails_that_row(tmp_path):
    _images(tmp_path, "ab")
    lst = _rows(tmp_path / "list.jsonl", [{"image": "a.png", "prompt": {"text": "a cat"}},
                                          {"image": "b.png", "prompt": "a dog"},
                                          {"image": "a.png", "prompt": 7}])  # fmt: skip
    items = list(iter_items([str(lst)], None))
    assert [(it.id, it.where) for it in items] == [(f"{lst}:1", f"{lst}:1"), ("b", f"{lst}:2"),
                                                   (f"{lst}:3", f"{lst}:3")]  # fmt: skip
    assert items[0].error == f"{lst}:1: 'prompt' is a JSON object, not a string; write the prompt as a string"
    assert items[2].error.startswith(f"{lst}:3: 'prompt' is a JSON number, not a string")
    assert items[1].error is None and items[1].prompt == "a dog"


def test_invert_goes_on_past_non_string_prompts(tmp_path, model_dir, capsys):
    _images(tmp_path, "abc")
    captions = _rows(tmp_path / "captions.jsonl", [{"image": "a.png", "prompt": {"text": "a cat"}},
                                                   {"image": "b.png", "prompt": "a dog"}])  # fmt: skip
    lst = _rows(tmp_path / "list.jsonl", [{"image": "c.png", "prompt": ["a", "bird"]}, {"image": "b.png"}])
    out = tmp_path / "out"
    args = ["invert", "--images", str(tmp_path / "a.png"), str(lst), "--captions", str(captions), "--output",
            str(out), f"model.spec={model_dir}", "--quiet", *FAST, "data.default_prompt='a default photo'"]  # fmt: skip
    assert main(args) == 3  # the bad list row failed; the others are done
    printed = capsys.readouterr()
    assert f"{captions}:1: 'prompt' is a JSON object, not a string; skipped" in printed.out + printed.err
    records = [json.loads(line) for p in sorted(out.glob("manifest*.jsonl")) for line in p.read_text().splitlines()]
    status = {r["id"]: (r["status"], r.get("prompt"), r.get("error")) for r in records}
    assert status["a"] == ("ok", "a default photo", None) and status["b"] == ("ok", "a dog", None)
    assert status[f"{lst}:1"][0] == "failed" and status[f"{lst}:1"][2].startswith(f"{lst}:1: 'prompt' is a JSON list")
