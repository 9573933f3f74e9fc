"""Claims: published whole, refused while the holder lives, taken over atomically when it is gone, held by a
heartbeat that notices a takeover; and why ``filelock`` does not do it (pinned)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from nti_lightning.run.claim import Claim, ClaimLostError, OutputLockedError, process_start
from nti_lightning.store.files import HOST


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _until(pred, timeout=10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_a_claim_is_published_whole_and_released(tmp_path):
    path = tmp_path / "locks" / "shard0.rank0.lock"
    c = Claim(path, session="s1", rank=0, shard=0)
    c.acquire()
    held = json.loads(path.read_text())
    assert held["host"] == HOST and held["pid"] == os.getpid() and held["session"] == "s1"
    assert held["start"] == process_start(os.getpid())
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary or token left
    c.release()
    assert not path.exists()


def test_a_live_holder_is_refused_with_its_name_and_a_dead_one_taken_over(tmp_path):
    path = tmp_path / "locks" / "shard0.lock"
    path.parent.mkdir()
    holder = _sleeper()
    try:
        path.write_text(json.dumps({"host": HOST, "pid": holder.pid, "started": "then"}))  # an older version's lock
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}") as e:
            Claim(path).acquire()
        assert "in use by another run" in str(e.value) and str(path) in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    lines = []
    c = Claim(path)
    c.acquire(lines.append)
    assert json.loads(path.read_text())["pid"] == os.getpid() and "took over the claim" in lines[0]
    c.release()


@pytest.mark.parametrize(
    "content",
    ["", "{", "[1, 2]", '{"host": null}', json.dumps({"host": HOST}), json.dumps({"host": HOST, "pid": "abc"})],
    ids=["empty", "torn", "a-list", "no-host", "no-pid", "pid-abc"],
)
def test_an_unreadable_or_incomplete_claim_is_taken_over_at_once(tmp_path, content):
    """Claims are published whole, so a claim like these is never a live run's: no 10-minute wait."""
    path = tmp_path / "shard0.lock"
    path.write_text(content)
    t0 = time.monotonic()
    c = Claim(path)
    c.acquire()
    assert time.monotonic() - t0 < 2 and json.loads(path.read_text())["pid"] == os.getpid()
    c.release()


def test_a_reused_pid_is_not_its_old_holder(tmp_path):
    path = tmp_path / "shard0.lock"
    me = os.getpid()
    path.write_text(json.dumps({"host": HOST, "pid": me, "start": "another-boot:1", "started": "x"}))
    c = Claim(path)
    c.acquire()  # this pid is alive, but it started at another time: the recorded holder is gone
    c.release()


def test_another_hosts_claim_stands_until_its_heartbeat_is_stale(tmp_path):
    path = tmp_path / "shard0.lock"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    with pytest.raises(OutputLockedError, match="elsewhere"):
        Claim(path).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))  # no heartbeat for an hour
    c = Claim(path)
    c.acquire()
    c.release()


def test_the_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    path = tmp_path / "shard0.lock"
    c = Claim(path, heartbeat_s=0.05)
    c.acquire()
    old = time.time() - 100
    os.utime(path, (old, old))
    _until(lambda: path.stat().st_mtime > old + 50)  # refreshed
    c.check()
    path.unlink()
    path.write_text(json.dumps({"host": HOST, "pid": os.getpid()}))  # another run's claim now
    _until(lambda: c.lost)
    with pytest.raises(ClaimLostError, match="taken over"):
        c.check()
    c.release()
    assert path.exists()  # not ours: left alone


RACER = textwrap.dedent(
    """
    import sys, time
    from nti_lightning.run.claim import Claim, OutputLockedError
    c = Claim(__import__("pathlib").Path(sys.argv[1]))
    try:
        c.acquire()
    except OutputLockedError as e:
        print("refused", flush=True)
        sys.exit(0)
    print("won", flush=True)
    time.sleep(4)
    c.release()
    """
)


def test_two_runs_that_both_judge_a_claim_stale_cannot_both_take_it(tmp_path):
    """The race the takeover must survive: both see the dead holder, both wait 1.5 s (injected) before taking
    over, then both try. Exactly one holds the claim; the other is refused."""
    path = tmp_path / "shard0.lock"
    path.write_text(json.dumps({"host": HOST, "pid": _dead_pid(), "started": "x"}))
    env = {**os.environ, "NTI_FAULT": "claim.takeover@1=sleep:1.5"}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
              for _ in range(2)]  # fmt: skip
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in racers)
    assert outs == ["refused", "won"], outs


def test_filelock_soft_locks_block_on_an_empty_marker():
    """Why the claim is not ``filelock``'s: its soft locks create the marker with O_EXCL and write the owner
    after, and an empty marker (a kill between the two) blocks every later acquire instead of being taken over."""
    import tempfile

    from filelock import SoftFileLease, Timeout

    with tempfile.TemporaryDirectory() as d:
        marker = os.path.join(d, "x.lock")
        open(marker, "w").close()
        with pytest.raises(Timeout):
            SoftFileLease(marker, lease_duration=0.5).acquire(timeout=2.0)
        c = Claim(__import__("pathlib").Path(marker))
        c.acquire()  # ours takes it over
        c.release()
