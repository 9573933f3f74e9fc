"""The commit stage (run/commits.py): in order on its own thread, bounded, stopped by the first error, drained
before a checkpoint; and the invert loop hands its writes to it."""

import threading
import time

import pytest

from nti_lightning.run.commits import CommitStage, StageStopped


def test_tasks_run_in_order_on_one_other_thread():
    stage, seen = CommitStage(depth=3), []
    for k in range(20):
        stage.submit(lambda k=k: seen.append((k, threading.current_thread().name)))
    stage.drain()  # the barrier: every side effect is there once it returns
    assert [k for k, _ in seen] == list(range(20))
    assert {name for _, name in seen} == {f"{stage.pool._thread_name_prefix}_0"}
    stage.close()


def test_submit_waits_while_depth_tasks_wait():
    stage, gate, returned = CommitStage(depth=2), threading.Event(), []
    stage.submit(gate.wait)
    stage.submit(lambda: None)  # two waiting: the next submit blocks until the first is done

    def third():
        stage.submit(lambda: None)
        returned.append(time.monotonic())

    t = threading.Thread(target=third)
    t.start()
    time.sleep(0.3)
    assert not returned  # still blocked behind the gate
    opened = time.monotonic()
    gate.set()
    t.join(5)
    assert returned and returned[0] >= opened
    stage.close()


def test_the_first_error_stops_the_stage_and_is_raised_once():
    stage, ran = CommitStage(depth=4), []
    gate = threading.Event()

    def boom():
        gate.wait()
        raise OSError(28, "No space left on device")

    stage.submit(boom)
    stage.submit(lambda: ran.append("after"))  # queued behind the failure: must not run (a torn shard tail)
    gate.set()
    with pytest.raises(OSError, match="No space left"):
        stage.drain()
    assert ran == []
    with pytest.raises(StageStopped):  # nor does anything submitted later
        stage.submit(lambda: ran.append("later"))
    stage.drain()
    assert ran == []
    stage.close()  # does not hang, nothing left to raise


def test_the_invert_loop_writes_on_the_commit_thread(model_dir, tmp_path, monkeypatch):
    """The shard appends and the record log's appends run on the commit stage's thread, not the loop's; a group's
    records are handed to the encoding threads by the loop itself (so the next group encodes while the stage
    writes this one) and encoded there."""
    from nti_lightning.cli import main
    from nti_lightning.jobs import invert_outputs
    from nti_lightning.store.records import RecordLog
    from nti_lightning.store.shard_writer import ShardWriter

    threads = {"append": set(), "log": set(), "start": set(), "encode": set()}
    append, log = ShardWriter.append, RecordLog.append_many
    start, encode = invert_outputs.ShardOutputs.encode, invert_outputs.inversion_to_bytes

    def spy_start(self, group):
        threads["start"].add(threading.current_thread().name)
        return start(self, group)

    def spy_encode(*args, **kwargs):
        threads["encode"].add(threading.current_thread().name)
        return encode(*args, **kwargs)

    def spy_append(self, records):
        threads["append"].add(threading.current_thread().name)
        return append(self, records)

    def spy_log(self, rows):
        threads["log"].add(threading.current_thread().name)
        return log(self, rows)

    monkeypatch.setattr(ShardWriter, "append", spy_append)
    monkeypatch.setattr(RecordLog, "append_many", spy_log)
    monkeypatch.setattr(invert_outputs.ShardOutputs, "encode", spy_start)
    monkeypatch.setattr(invert_outputs, "inversion_to_bytes", spy_encode)
    images = tmp_path / "in"
    images.mkdir()
    from PIL import Image

    for k in range(3):
        Image.new("RGB", (64, 64), (40 * k, 90, 200)).save(images / f"{k}.png")
    args = ["invert", "--images", str(images), "--output", str(tmp_path / "out"), f"model.spec={model_dir}",
            "data.default_prompt=a square", "inversion.num_ddim_steps=2", "inversion.num_inner_steps=1",
            "inversion.image_size=64", "inversion.batch_size=2", "output.compute_baseline=false",
            "output.layout=shards", "trainer.accelerator=cpu", "--quiet"]  # fmt: skip
    assert main(args) == 0
    main_thread = threading.main_thread().name
    assert threads["append"] and threads["log"]
    assert all(name.startswith("nti-commit") and name != main_thread for name in threads["append"] | threads["log"])
    assert threads["start"] == {main_thread}
    assert threads["encode"] and all(name.startswith("nti-enc") for name in threads["encode"])
