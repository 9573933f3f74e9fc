"""The slot engine's whole state (``slots.SlotEngine.state_dict``): enough to continue bit for bit.

Only the occupied slots' rows of the bank and of the optimiser are kept: nothing of an image that left a slot is
read again (a new image overwrites what it reads before reading it), so a checkpoint's size follows the images in
flight, and the one written when a stream starts is nearly empty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from nti_lightning.engine.algorithm import Progress, Request

if TYPE_CHECKING:
    from nti_lightning.engine.slots import SlotEngine


@dataclass
class SlotState:
    """One image in a slot: its tag and prompt, where it stands in its algorithm, its pending request."""

    tag: Any
    prompt: str
    progress: Progress
    request: Request | None = None
    since: int = 0  # tick at which ``request`` was made: the oldest requests are served first
    seconds: float = 0.0  # share of the UNet calls' time so far
    gen: Any = field(default=None, repr=False)


def _per_slot(name: str) -> bool:
    """Whether a bank tensor has one row per slot (all but the model's null, ``null_<key>``)."""
    return not name.startswith("null_")


def engine_state(engine: SlotEngine) -> dict:
    """Everything needed to continue bit for bit: the rows of the occupied slots of the bank (parameters and
    buffers) and of the optimiser, the precision plugin's state (16-mixed's loss scale), every slot's
    progress. Free slots are not saved: nothing of an image that left a slot is read again."""
    occupied = [s for s, st in enumerate(engine.slots) if st is not None]
    rows = torch.tensor(occupied, dtype=torch.long)
    bank = {}
    for k, v in engine.bank.state_dict().items():
        v = v.detach().cpu()
        bank[k] = v[rows].clone() if _per_slot(k) else v.clone()
    adam = None
    if engine.adam is not None:
        live = engine.adam.state_dict()  # (its "state" dicts are the optimiser's own: copied, never changed)
        adam = {
            "param_groups": live["param_groups"],
            "row_steps": live["row_steps"][rows].clone(),
            "state": {
                i: {name: v.detach().cpu()[rows].clone() for name, v in st.items()} for i, st in live["state"].items()
            },
        }
    return {
        "occupied": occupied,
        "bank": bank,
        "adam": adam,
        "precision": engine.runtime.precision_state(),
        "tick": engine.tick,
        "slots": [
            None
            if st is None
            else {
                "tag": st.tag,
                "prompt": st.prompt,
                "progress": asdict(st.progress),
                "request": [st.request.kind.value, st.request.index],
                "since": st.since,
                "seconds": st.seconds,
            }
            for st in engine.slots
        ],
        "calls": dict(engine.calls),
    }


def load_engine_state(engine: SlotEngine, state: dict) -> None:
    if len(state["slots"]) != engine.num_slots:
        raise ValueError(f"checkpoint has {len(state['slots'])} slots, this engine {engine.num_slots}")
    rows = torch.tensor(state["occupied"], dtype=torch.long)
    full = engine.bank.state_dict()
    for k, v in state["bank"].items():
        if _per_slot(k):
            full[k] = torch.zeros_like(full[k])
            full[k][rows.to(full[k].device)] = v.to(full[k].device)
        else:
            full[k] = v.to(full[k].device)
    engine.bank.load_state_dict(full)
    if engine.adam is not None:
        saved, live = state["adam"], engine.adam.state_dict()
        steps = torch.zeros_like(live["row_steps"])
        steps[rows] = saved["row_steps"]
        whole = {"param_groups": live["param_groups"], "row_steps": steps, "state": {}}
        for i, st in live["state"].items():
            whole["state"][i] = {}
            for name, v in st.items():
                full = torch.zeros_like(v)
                full[rows.to(v.device)] = saved["state"][i][name].to(v.device)
                whole["state"][i][name] = full
        engine.adam.load_state_dict(whole)
    engine.runtime.load_precision_state(state["precision"])
    engine.tick = int(state["tick"])
    engine.calls = dict(state["calls"])
    for s, saved in enumerate(state["slots"]):
        if saved is None:
            engine.slots[s] = None
            continue
        engine.slots[s] = SlotState(saved["tag"], saved["prompt"], Progress(**saved["progress"]))
        engine._start(s)
        kind, index = saved["request"]
        if (engine.slots[s].request.kind.value, engine.slots[s].request.index) != (kind, index):
            raise ValueError(f"checkpoint slot {s}: saved request {kind}@{index} is not where its progress leads")
        engine.slots[s].since = int(saved["since"])
        engine.slots[s].seconds = float(saved.get("seconds", 0.0))
