"""Checkpoints through Lightning's CheckpointIO: atomic, checksummed; an empty, truncated, foreign or corrupt file
is named for what it is; the engine's state (occupied slots only) round-trips exactly."""

from __future__ import annotations

import pytest
import torch

from nti_lightning.config import InversionConfig
from nti_lightning.data.image import prepare_image
from nti_lightning.engine.slots import Admission, SlotEngine, Tick
from nti_lightning.run.checkpoint import CheckpointError, WorkerCheckpointIO, load_checkpoint, save_checkpoint


def test_a_checkpoint_round_trips_and_bad_files_say_what_they_are(tmp_path):
    io_ = WorkerCheckpointIO()
    path = tmp_path / "c.pt"
    save_checkpoint(io_, path, {"rows": 2}, {"x": torch.arange(4)}, {"img": {"sha256": "0"}})
    ck = load_checkpoint(io_, path)
    assert torch.equal(ck["engine"]["x"], torch.arange(4)) and ck["items"] == {"img": {"sha256": "0"}}
    data = path.read_bytes()
    cases = {
        "is empty": b"",
        "is truncated": data[: len(data) - 100],
        "foreign file": b"PK\x03\x04" + data[4:],
        "is corrupt": data[:200] + bytes(b ^ 0xFF for b in data[200:264]) + data[264:],  # 64 bytes flipped
    }
    for what, content in cases.items():
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=what):
            load_checkpoint(io_, path)
    path.unlink()
    assert load_checkpoint(io_, path) is None


def test_the_engine_state_of_occupied_slots_resumes_exactly(random_model, sample_images):
    cfg = InversionConfig(num_ddim_steps=3, num_inner_steps=2, image_size=64, batch_invariant=True)
    adms = [Admission(k, prepare_image(im, 64), p) for k, (im, p) in enumerate(zip(sample_images, ["a", "b", "c"]))]

    def run(stop_at=None, state=None):
        engine = SlotEngine(random_model, cfg, rows=1, slots=2)
        if state is not None:
            engine.load_state_dict(state)
        source = iter(adms if state is None else adms[len(state["done"]) + 2 :])
        out = {}
        for ev in engine.run(source):
            if isinstance(ev, Tick) and ev.number == stop_at:
                st = engine.state_dict()
                st["done"] = list(out)
                return st
            if not isinstance(ev, Tick):
                out[ev.tag] = ev.inversion
        return out

    full = run()
    state = run(stop_at=9)
    assert len(state["occupied"]) == 2 and state["bank"]["trajectory"].shape[0] == 2  # only the slots in use
    resumed = run(state=state)
    for k in resumed:
        assert torch.equal(resumed[k].null_embeddings, full[k].null_embeddings), k
