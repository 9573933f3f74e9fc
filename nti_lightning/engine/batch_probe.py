"""``inversion.batch_size=auto`` on a GPU: the rows per UNet call that fit in its memory."""

from __future__ import annotations

import torch

from nti_lightning.config import InversionConfig
from nti_lightning.engine.algorithm import Kind, Progress, Request
from nti_lightning.engine.runtime import Runtime
from nti_lightning.engine.slot_state import SlotState
from nti_lightning.engine.slots import SlotEngine


def probe_batch_size(model, cfg: InversionConfig, runtime: Runtime, image_size: int, cap: int = 64) -> int:
    """``inversion.batch_size=auto`` on a GPU: the largest power of two ≤ ``cap`` rows whose inner step (the
    grad call, the largest) fits in 85% of the free memory. Peak memory is measured at 1 and 2 rows and
    extrapolated linearly (activations grow with the rows, weights do not), then the choice is tried once;
    an out-of-memory error halves it."""
    device = model.device

    def peak(rows: int) -> int:
        engine = SlotEngine(model, cfg, rows, runtime, slots=rows, image_size=image_size)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for s in range(rows):
            engine.slots[s] = SlotState(s, "", Progress(), Request(Kind.INNER, 0, cfg.learning_rate))
        engine._run_grad(list(range(rows)))
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base

    free, _ = torch.cuda.mem_get_info(device)
    one, two = peak(1), peak(2)
    per_row, fixed = max(two - one, 1), max(2 * one - two, 0)
    rows = 1
    while rows * 2 <= cap and fixed + per_row * rows * 2 <= 0.85 * free:
        rows *= 2
    while rows > 1:
        try:
            peak(rows)
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows //= 2
    return rows
