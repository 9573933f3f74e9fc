"""Precision through Fabric: the nulls are the module's parameters, the per-row Adam steps through Fabric's
precision plugin, 16-mixed scales per row; and why the slot bank is not wrapped by ``fabric.setup_module``."""

from __future__ import annotations

import lightning as L
import torch

from nti_lightning.config import InversionConfig
from nti_lightning.data.image import prepare_image
from nti_lightning.engine.nulltext import RowAdam, RowLossScaler
from nti_lightning.engine.runtime import Runtime, precision_plugins
from nti_lightning.engine.slots import Admission, Finished, SlotEngine


def _fabric(precision: str) -> L.Fabric:
    return L.Fabric(accelerator="cpu", devices=1, **precision_plugins(precision, "cpu"))


def test_fabric_module_wrapper_casts_inputs_so_the_bank_is_not_wrapped():
    """Pinned reason: under 16-mixed ``fabric.setup_module`` casts every floating input of a forward to fp16 —
    it would round z*_{t−1} and z̄_t in the loss and DDIM step. The engine autocasts the UNet alone."""

    class Probe(L.LightningModule):
        def forward(self, x):
            return torch.tensor(float(x.dtype == torch.float16))

    wrapped = _fabric("16-mixed").setup_module(Probe())
    assert wrapped(torch.zeros(2, dtype=torch.float32)).item() == 1.0


def test_16_mixed_runs_with_the_per_row_scaler_as_fabrics_plugin(random_model, sample_images):
    fabric = _fabric("16-mixed")
    runtime = Runtime(fabric)
    assert runtime.precision == "16-mixed" and isinstance(fabric.strategy.precision.scaler, RowLossScaler)
    cfg = InversionConfig(num_ddim_steps=2, num_inner_steps=2, image_size=64, early_stop=False)
    engine = SlotEngine(random_model, cfg, rows=2, runtime=runtime)
    assert isinstance(engine.adam, RowAdam) and {id(p) for p in engine.adam.params} == {
        id(p) for p in engine.bank.parameters()
    }
    adm = [Admission(k, prepare_image(im, 64), f"p{k}") for k, im in enumerate(sample_images[:2])]
    done = [ev for ev in engine.run(adm) if isinstance(ev, Finished)]
    assert len(done) == 2
    for ev in done:
        inv = ev.inversion
        assert inv.null_embeddings.dtype == torch.float32 and torch.isfinite(inv.null_embeddings).all()
        assert int(inv.inner_steps.sum()) == 2 * 2 and inv.meta["precision"] == "16-mixed"
    assert runtime.precision_state()["scale"] > 0  # the scaler's state goes into checkpoints


def test_row_loss_scaler_skips_only_the_rows_that_overflow():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    adam, scaler = RowAdam([p]), RowLossScaler(init_scale=4.0)
    p.grad = torch.tensor([[4.0, 4.0], [float("inf"), 0.0], [8.0, -8.0]])
    adam.select(torch.tensor([0, 1, 2]), [0.1, 0.1, 0.1], torch.tensor([True, True, True]))
    scaler.step(adam)
    scaler.update()
    assert adam.applied.tolist() == [True, False, True] and scaler.scale_value == 2.0  # halved after an overflow
    assert (p[1] == 0).all() and (p[0] != 0).all() and (p[2] != 0).all()
    assert adam.steps.tolist() == [1, 0, 1]  # the skipped row is not charged
