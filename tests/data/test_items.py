"""The items of a dataset run, streamed with bounded memory: list files (JSONL/CSV/TXT), the disk-backed caption
index, duplicate ids, the compact manifest index, laziness; and `nti invert` end to end on list files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from nti_lightning.cli import main
from nti_lightning.data.inputs import iter_items
from nti_lightning.data.items import CaptionIndex, Item, read_captions
from nti_lightning.run import read_manifest
from nti_lightning.run.status import status
from nti_lightning.store.records import FAILED, OK, RunIndex, write_legacy_index

FAST = ["inversion.num_ddim_steps=3", "inversion.num_inner_steps=2", "inversion.image_size=64",
        "inversion.batch_size=1", "output.compute_baseline=false", "output.save_strip=false",
        "output.checkpoint_every_s=0", "trainer.accelerator=cpu"]  # fmt: skip


def _old_read_captions(path):
    """The dict-based reader this index replaced: the reference semantics."""
    captions, warnings = {}, []

    def add(row, where):
        if not isinstance(row, dict) or "image" not in row:
            warnings.append(f"{where}: row has no 'image' field; skipped")
            return
        captions.setdefault(str(row["image"]).replace("\\", "/"), []).append(row.get("prompt"))

    if str(path).endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):
                add(row, f"{path}:{n}")
    else:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    warnings.append(f"{path}:{n}: not valid JSON ({e.msg}); skipped")
                    continue
                add(row, f"{path}:{n}")
    return captions, warnings


def test_caption_index_equals_the_old_dict(tmp_path):
    rows = [{"image": "a.png", "prompt": "a cat"}, {"image": "sub\\b.png", "prompt": "a dog"},
            {"image": "a.png", "prompt": "a cat"}, {"image": "c.png", "prompt": "one"},
            {"image": "c.png", "prompt": "two"}, {"image": "d", "prompt": None}, {"image": "e", "prompt": 7},
            {"prompt": "no image"}, [1, 2]]  # fmt: skip
    lines = [json.dumps(r) for r in rows[:4]] + ["", "{not json"] + [json.dumps(r) for r in rows[4:]]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    table = tmp_path / "c.csv"
    table.write_text('image,prompt\na.png,a cat\nb.png,"a dog, sitting"\nb.png,a dog\nshort\n')
    for path in (jsonl, table):
        index, warnings = read_captions(path)
        old, old_warnings = _old_read_captions(path)
        assert isinstance(index, CaptionIndex) and index == old and dict(index) == old
        assert warnings == old_warnings and list(index) == list(old) and len(index) == len(old)
        for key in [*old, "missing", "A.png"]:
            assert (key in index) == (key in old) and index.get(key) == old.get(key)
            keys = ("missing", key, "a.png")
            assert index.first(keys) == next((old[k] for k in keys if k in old), None)
        with pytest.raises(KeyError):
            index["missing"]
        index.close()
    index, warnings = read_captions(jsonl)
    assert index["c.png"] == ["one", "two"] and index["sub/b.png"] == ["a dog"] and index["e"] == [7]
    assert [w.split(": ", 1)[0] for w in warnings] == [f"{jsonl}:6", f"{jsonl}:10", f"{jsonl}:11"]


def test_folder_ids_duplicates_and_captions(tmp_path):
    caps, tmp_path = tmp_path / "caps.jsonl", tmp_path / "data"
    for rel in ("a.png", "a.jpg", "sub/a.png", "sub/deeper/b.PNG", "notes.txt", "z.webp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")  # never opened here
    rows = [{"image": "a.jpg", "prompt": "by path"}, {"image": "sub/a.png", "prompt": "nested"},
            {"image": "b.PNG", "prompt": "by name"}, {"image": "z", "prompt": "x"},
            {"image": "z", "prompt": "y"}]  # fmt: skip
    caps.write_text("\n".join(json.dumps(r) for r in rows))
    captions, _ = read_captions(caps)
    items = list(iter_items([str(tmp_path), str(tmp_path / "a.png")], captions, "default"))
    assert [(it.id, it.prompt, it.error) for it in items] == [
        ("a", "by path", None),
        ("a.png", None, f"duplicate image id 'a': also {tmp_path / 'a.jpg'}; rename one"),
        ("sub__a", "nested", None),
        ("sub__deeper__b", "by name", None),
        ("z", "x", "2 different captions for z.webp; keep one row per image"),
        ("a.png", None, f"duplicate image id 'a': also {tmp_path / 'a.jpg'}; rename one"),  # the file named again
    ]
    assert items[3].path == str(tmp_path / "sub" / "deeper" / "b.PNG") and items[0].where is None
    assert [it.id for it in iter_items([str(tmp_path)], None)] == ["a", "a.png", "sub__a", "sub__deeper__b", "z"]
    assert all(it.prompt is None for it in iter_items([str(tmp_path)], None))
    captions.close()


def test_list_files_rows_prompts_and_bad_rows(tmp_path):
    (tmp_path / "lists").mkdir()
    jsonl, table, txt = (tmp_path / "lists" / n for n in ("l.jsonl", "l.csv", "l.txt"))
    jsonl.write_bytes(
        b'{"image": "img/a.png", "prompt": "row prompt"}\n'  # 1: the row's prompt wins over the captions
        b'{"image": "img/b.png"}\n'  # 2: captions
        b"\n"  # 3: blank, skipped
        b"{broken\n"  # 4
        b'{"prompt": "no image"}\n'  # 5
        b'["img/x.png"]\n'  # 6
        b'{"image": "/abs/dir/c.jpg", "prompt": ""}\n'  # 7: absolute; empty prompt → default
        b'{"image": "../up/d.png", "prompt": null}\n'  # 8
        b'{"image": "img/\xff.png"}\n'  # 9: not UTF-8
        b'{"image": "img/a.png"}\n'  # 10: duplicate
    )
    table.write_text('\ufeffimage, prompt\nimg/e.png,"a photo, of e"\n ,x\nimg/f.png,\n')
    txt.write_text("img/g.png\n\n  ./img/h.jpg  \n")
    captions = {"img/a.png": ["caption a"], "b.png": ["caption b"], "img/f": ["caption f"]}
    items = list(iter_items([str(jsonl), str(table), str(txt)], captions, "default"))
    lj, lc, lt = str(jsonl), str(table), str(txt)
    got = [(it.id, it.path, it.prompt, it.where) for it in items if it.error is None]
    assert got == [
        ("img__a", os.path.join(tmp_path, "lists", "img/a.png"), "row prompt", f"{lj}:1"),
        ("img__b", os.path.join(tmp_path, "lists", "img/b.png"), "caption b", f"{lj}:2"),
        ("abs__dir__c", "/abs/dir/c.jpg", "default", f"{lj}:7"),
        ("up__d", os.path.join(tmp_path, "lists", "../up/d.png"), "default", f"{lj}:8"),
        ("img__e", os.path.join(tmp_path, "lists", "img/e.png"), "a photo, of e", f"{lc}:2"),
        ("img__f", os.path.join(tmp_path, "lists", "img/f.png"), "caption f", f"{lc}:4"),
        ("img__g", os.path.join(tmp_path, "lists", "img/g.png"), "default", f"{lt}:1"),
        ("img__h", os.path.join(tmp_path, "lists", "./img/h.jpg"), "default", f"{lt}:3"),
    ]
    bad = {it.id: it.error for it in items if it.error is not None}
    assert list(bad) == [f"{lj}:4", f"{lj}:5", f"{lj}:6", f"{lj}:9", "img__a.png", f"{lc}:3"]
    assert bad[f"{lj}:4"].startswith(f"{lj}:4: not valid JSON") and "fix or remove the line" in bad[f"{lj}:4"]
    assert bad[f"{lj}:5"] == f"{lj}:5: no image path in the row; give the image's path (relative to the list's folder)"
    assert "not a JSON object" in bad[f"{lj}:6"] and "not valid UTF-8" in bad[f"{lj}:9"]
    assert bad["img__a.png"].startswith(f"{lj}:10: duplicate image id 'img__a': also ")
    assert bad[f"{lc}:3"].startswith(f"{lc}:3: no image path")
    assert Item("x", "p.png", None, where="l.txt:3").label == "p.png (l.txt:3)"

    headless = tmp_path / "lists" / "h.csv"
    headless.write_text("path,prompt\nimg/a.png,x\n")
    (only,) = iter_items([str(headless)], None)
    assert only.id == f"{headless}:1" and "needs a header row with a column 'image'" in only.error
    (missing,) = iter_items([str(tmp_path / "nope.txt")], None)
    assert "cannot read the list file" in missing.error


def _manifest_lines(recs):
    return "".join(json.dumps(r) + "\n" for r in recs)


def test_manifest_index_latest_record_wins_cut_line_ignored(tmp_path):
    ok = {"status": "ok", "metrics": {"psnr": 1.0}}
    (tmp_path / "manifest.rank0.jsonl").write_text(
        _manifest_lines([
            {"id": "a", "status": "failed", "error": "boom", "finished_at": 1.0},
            {"id": "b", **ok, "paths": {"inversion": "b/inversion.safetensors"}, "finished_at": 5.0},
            {"id": "c", "status": "failed", "error": "first", "finished_at": 3.0},
            {"id": "c", "status": "failed", "error": "tie: the later line wins", "finished_at": 3.0},
        ])
        + '{"id": "d", "status": "ok", "paths": {"inver'  # cut by a kill
    )  # fmt: skip
    (tmp_path / "manifest.rank1.jsonl").write_text(
        _manifest_lines([
            {"id": "a", **ok, "paths": {"inversion": "a/inversion.safetensors"}, "finished_at": 2.0},
            {"id": "b", "status": "failed", "error": "older", "finished_at": 4.0},
            {"id": "e", "status": "failed", "error": "only", "finished_at": 1.0},
        ])
    )  # fmt: skip
    records = read_manifest(tmp_path)
    s = status(tmp_path)  # a folder from before the index: read from its manifests, nothing written
    assert s["done"] == 2 and s["failed"] == {"c": "tie: the later line wins", "e": "only"} and s["total"] is None
    assert not (tmp_path / ".nti").exists()
    write_legacy_index(tmp_path, sorted(tmp_path.glob("manifest*.jsonl")))  # what the first rerun does
    index = RunIndex.load(tmp_path)
    assert len(index) == len(records) == 4 and index.get("d") is None and index.get("zzz") is None
    for k, rec in records.items():
        assert index.get(k)["status"] == (OK if rec["status"] == "ok" else FAILED)
    assert index.get("b")["status"] == OK and index.count(OK) == 2


def test_iter_items_streams_a_long_list(tmp_path):
    n = 200_000
    lst = tmp_path / "big.jsonl"
    with open(lst, "w", encoding="utf-8") as f:
        for k in range(n):
            f.write(f'{{"image": "p{k // 1000:03d}/img{k:07d}.jpg", "prompt": "thing {k}"}}\n')
    cut = tmp_path / "cut.jsonl"
    shutil.copy(lst, cut)
    it = iter_items([str(cut)], None)
    first = next(it)
    assert first.id == "p000__img0000000" and first.prompt == "thing 0"
    os.truncate(cut, 0)  # an eager reader would already hold all 200,000 rows
    assert sum(1 for _ in it) < n // 10  # what the first read's buffer held

    t0 = time.perf_counter()
    count = mine = 0
    for k, item in enumerate(iter_items([str(lst)], None)):
        count += 1
        mine += k % 3 == 1 and (k // 3) % 2 == 0
        assert item.error is None
    assert count == n and mine == len(range(1, n, 3)[::2])
    assert time.perf_counter() - t0 < 10  # ~1.5 s here


@pytest.fixture(scope="module")
def list_dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("lists")
    (d / "imgs").mkdir()
    rng = np.random.default_rng(3)
    for name in ("a", "b", "c", "d"):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(d / "imgs" / f"{name}.png")
    rows = ['{"image": "imgs/a.png", "prompt": "a photo from the row"}', '{"image": "imgs/b.png"}', "{oops",
            '{"image": "imgs/missing.png", "prompt": "a photo"}', '{"prompt": "no image"}']  # fmt: skip
    (d / "list.jsonl").write_text("\n".join(rows) + "\n")
    (d / "list.csv").write_text("image,prompt\nimgs/d.png,a photo from the csv\n")
    (d / "list.txt").write_text("imgs/c.png\n")
    (d / "captions.jsonl").write_text(
        '{"image": "imgs/a.png", "prompt": "loses to the row"}\n{"image": "b.png", "prompt": "a photo from captions"}\n'
    )
    return d


def test_invert_list_files_end_to_end(list_dataset, model_dir, tmp_path, capsys):
    d, out = list_dataset, tmp_path / "out"
    lists = [str(d / "list.jsonl"), str(d / "list.csv"), str(d / "list.txt")]
    args = ["invert", "--images", *lists, "--captions", str(d / "captions.jsonl"), "--output", str(out),
            f"model.spec={model_dir}", "--quiet", *FAST, "data.default_prompt='a default photo'"]  # fmt: skip
    assert main(args) == 3  # some images failed
    assert "4 inverted, 3 failed" in capsys.readouterr().out
    records = read_manifest(out)
    prompts = {k: r["prompt"] for k, r in records.items() if r["status"] == "ok"}
    assert prompts == {"imgs__a": "a photo from the row", "imgs__b": "a photo from captions",
                       "imgs__c": "a default photo", "imgs__d": "a photo from the csv"}  # fmt: skip
    for k in prompts:
        assert (out / records[k]["paths"]["inversion"]).is_file()
    errors = {k: r["error"] for k, r in records.items() if r["status"] != "ok"}
    lj = lists[0]
    assert set(errors) == {f"{lj}:3", "imgs__missing", f"{lj}:5"}
    assert errors[f"{lj}:3"].startswith(f"{lj}:3: not valid JSON")
    assert errors["imgs__missing"].startswith(f"{lj}:4: image {d / 'imgs' / 'missing.png'} not found; fix the path")
    assert errors[f"{lj}:5"].startswith(f"{lj}:5: no image path")
    assert json.loads((out / "progress" / "rank0.json").read_text())["total"] == 7

    assert main(args) == 3  # a rerun skips everything recorded (the compact manifest index)
    assert "0 inverted, 0 failed, 7 already done" in capsys.readouterr().out
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 done, 3 failed, 0 pending of 7" in printed and f"failed {lj}:3: {lj}:3: not valid JSON" in printed
