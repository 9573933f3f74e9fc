"""Every place the package relies on a diffusers, transformers, Lightning or torchmetrics internal: a test that
fails, naming the internal, the day a release changes it (CI runs these at the declared floors and at the newest
releases, docs/versions.md). Behaviour built on each is tested elsewhere; these pin the contract itself."""

from __future__ import annotations

import inspect

import pytest
import torch

# ---------------------------------------------------------------------------------------------------------
# diffusers: Attention.forward (models/attention_dispatch.py)
# ---------------------------------------------------------------------------------------------------------


def test_attention_forward_has_the_contract_the_direct_dispatch_reproduces():
    from diffusers.models.attention_processor import Attention

    from nti_lightning.models.attention_dispatch import FORWARD_PARAMETERS, forward_parameters

    assert forward_parameters(Attention) == FORWARD_PARAMETERS, (
        "diffusers' Attention.forward changed its parameters: check models/attention_dispatch._direct_forward "
        "against the new forward before widening TESTED_DIFFUSERS"
    )
    source = inspect.getsource(Attention.forward)
    assert "self.processor(" in source and "inspect.signature(self.processor.__call__)" in source


def test_installed_diffusers_is_one_the_direct_dispatch_is_tested_on():
    import diffusers
    from packaging.version import Version

    from nti_lightning.models.attention_dispatch import TESTED_DIFFUSERS, direct_dispatch_enabled

    low, high = (Version(v) for v in TESTED_DIFFUSERS)
    assert low <= Version(diffusers.__version__) < high, (
        f"diffusers {diffusers.__version__} is outside TESTED_DIFFUSERS {TESTED_DIFFUSERS}: the direct attention "
        "dispatch is off there. Run tests/models/test_attention_dispatch.py on it, "
        "then widen the range (or lower the floor)"
    )
    assert direct_dispatch_enabled()


def test_dispatch_check_refuses_other_versions_and_other_signatures():
    from diffusers.models.attention_processor import Attention

    from nti_lightning.models.attention_dispatch import TESTED_DIFFUSERS, dispatch_check

    assert dispatch_check(TESTED_DIFFUSERS[0], Attention) is None
    assert "outside the range" in dispatch_check("0.28.1", Attention)
    assert "outside the range" in dispatch_check(TESTED_DIFFUSERS[1], Attention)

    class Changed(Attention):
        def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            return super().forward(hidden_states, encoder_hidden_states, attention_mask)

    assert "image_rotary_emb" in dispatch_check(TESTED_DIFFUSERS[0], Changed)


def test_outside_the_tested_range_the_stock_forward_runs_with_one_log_line(monkeypatch, caplog, random_model):
    import diffusers

    from nti_lightning.models import attention_dispatch as ad
    from nti_lightning.models.tiny import build_random_components

    monkeypatch.setattr(diffusers, "__version__", "99.0.0")
    ad._installed_check.cache_clear()
    try:
        unet = build_random_components(0)["unet"]
        with caplog.at_level("WARNING", logger=ad.__name__):
            assert ad.direct_attention_dispatch(unet) == 0
            assert ad.direct_attention_dispatch(unet) == 0
        assert not any("forward" in m.__dict__ for m in ad._attention_modules(unet))
        lines = [r.getMessage() for r in caplog.records if r.name == ad.__name__]
        assert len(lines) == 1 and "diffusers 99.0.0 is outside the range" in lines[0]
    finally:
        ad._installed_check.cache_clear()


# ---------------------------------------------------------------------------------------------------------
# diffusers: the attention processor P2P replaces (p2p/attention.py)
# ---------------------------------------------------------------------------------------------------------

P2P_ATTENTION_MEMBERS = (
    "spatial_norm", "group_norm", "norm_cross", "residual_connection", "rescale_output_factor", "to_q", "to_k",
    "to_v", "to_out", "prepare_attention_mask", "norm_encoder_hidden_states", "head_to_batch_dim",
    "get_attention_scores", "batch_to_head_dim",
)  # fmt: skip
"""What ``P2PAttnProcessor`` reads off a diffusers ``Attention`` module (as diffusers' ``AttnProcessor`` does)."""


def test_attn_processor_call_and_the_attention_members_p2p_uses(random_model):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    params = list(inspect.signature(AttnProcessor.__call__).parameters)
    assert params[:6] == ["self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "temb"]
    attn = next(m for m in random_model.unet.modules() if isinstance(m, Attention))
    missing = [name for name in P2P_ATTENTION_MEMBERS if not hasattr(attn, name)]
    assert not missing, f"diffusers' Attention no longer has {missing}: update p2p/attention.P2PAttnProcessor"


def test_attn_processor_names_carry_the_unet_block(random_model):
    from nti_lightning.p2p.attention import place_in_unet

    names = list(random_model.unet.attn_processors)
    assert names and all(n.endswith(".processor") for n in names)
    assert {place_in_unet(n) for n in names} == {"down", "mid", "up"}


# ---------------------------------------------------------------------------------------------------------
# diffusers: single-file helpers (models/loading.py)
# ---------------------------------------------------------------------------------------------------------


def test_single_file_helpers_keep_their_signatures():
    from diffusers.loaders import single_file_utils as sfu

    convert = inspect.signature(sfu.convert_open_clip_checkpoint).parameters
    assert list(convert)[:2] == ["text_model", "checkpoint"] and "prefix" in convert
    assert list(inspect.signature(sfu.load_single_file_checkpoint).parameters)[0] == "pretrained_model_link_or_path"
    for cls in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        params = inspect.signature(getattr(__import__("diffusers"), cls).from_single_file).parameters
        assert "pretrained_model_link_or_path" in params, cls


# ---------------------------------------------------------------------------------------------------------
# diffusers: config keys read by name (models/detect.py, family.py, loading.py, ddim.py)
# ---------------------------------------------------------------------------------------------------------

CONFIG_KEYS = {
    "DDIMScheduler": ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "clip_sample",
                      "set_alpha_to_one", "steps_offset", "prediction_type", "thresholding", "timestep_spacing",
                      "rescale_betas_zero_snr"),
    "UNet2DConditionModel": ("sample_size", "in_channels", "down_block_types", "block_out_channels",
                             "cross_attention_dim", "attention_head_dim", "num_attention_heads",
                             "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
                             "projection_class_embeddings_input_dim"),
    "AutoencoderKL": ("block_out_channels", "latent_channels", "scaling_factor", "force_upcast"),
    "StableDiffusionXLPipeline": ("force_zeros_for_empty_prompt", "add_watermarker"),
}  # fmt: skip
"""Config keys the package reads with ``config.get(key, default)``: a renamed key would silently give the
default, so each must still be a constructor argument (diffusers' ``register_to_config`` keys)."""


@pytest.mark.parametrize("cls", sorted(CONFIG_KEYS))
def test_config_keys_read_by_name_are_still_constructor_arguments(cls):
    import diffusers

    params = inspect.signature(getattr(diffusers, cls).__init__).parameters
    missing = [k for k in CONFIG_KEYS[cls] if k not in params]
    assert not missing, f"diffusers' {cls} no longer takes {missing}"


def test_ddim_scheduler_exposes_the_alphas_the_ddim_steps_read():
    from diffusers import DDIMScheduler

    from nti_lightning.models.tiny import SCHEDULER_CONFIG

    sched = DDIMScheduler(**SCHEDULER_CONFIG)
    assert sched.alphas_cumprod.shape == (1000,) and sched.final_alpha_cumprod == sched.alphas_cumprod[0]


# ---------------------------------------------------------------------------------------------------------
# transformers: the weight layout of the embedded text encoders
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["tiny/text_encoder", "tiny_sd2/text_encoder", "tiny_sdxl/text_encoder_2"])
def test_embedded_text_encoders_load_every_weight(folder):
    """transformers 4 leaves weights stored without ``text_model.`` randomly initialised, with only a log line."""
    import json

    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from nti_lightning.models.embedded import ASSETS_DIR

    path = ASSETS_DIR / folder
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    cls = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}[arch]
    _, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


# ---------------------------------------------------------------------------------------------------------
# Lightning Fabric: what the engine relies on (engine/runtime.py, run/launch.py, run/checkpoint.py)
# ---------------------------------------------------------------------------------------------------------


class _RecordingScaler:
    def __init__(self) -> None:
        self.calls = []

    def scale(self, loss):
        self.calls.append("scale")
        return loss * 2.0

    def step(self, optimizer, **kwargs):
        self.calls.append("step")
        return optimizer.step(**kwargs)

    def update(self):
        self.calls.append("update")

    def state_dict(self):
        return {}


def test_fabric_drives_the_per_row_scaler_through_its_precision_plugin():
    """``nulltext.RowLossScaler`` stands in for a GradScaler: Fabric's ``MixedPrecision`` must call its ``scale`` in
    ``fabric.backward`` and ``step`` then ``update`` in the set-up optimiser's ``step``, and expose the plugin and
    the checkpoint I/O given to it where ``Runtime`` and the worker read them."""
    import lightning as L
    from lightning.fabric.plugins import MixedPrecision

    from nti_lightning.run.checkpoint import WorkerCheckpointIO

    scaler, io_ = _RecordingScaler(), WorkerCheckpointIO()
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler), io_])
    assert fabric.strategy.precision.precision == "16-mixed" and fabric.strategy.precision.scaler is scaler
    assert fabric.strategy.checkpoint_io is io_
    p = torch.nn.Parameter(torch.ones(2))
    opt = fabric.setup_optimizers(torch.optim.SGD([p], lr=0.1))
    fabric.backward((p * 3).sum())
    opt.step()
    assert scaler.calls == ["scale", "step", "update"] and torch.allclose(p.detach(), torch.full((2,), 1 - 0.1 * 6))


# ---------------------------------------------------------------------------------------------------------
# diffusers: the name of from_pretrained's dtype argument (models/compat.py)
# ---------------------------------------------------------------------------------------------------------


def test_dtype_argument_takes_effect_under_the_name_passed_without_a_deprecation():
    """The tiny VAE is stored in fp16: an argument under a name the release ignores would leave it fp16."""
    import warnings

    from diffusers import AutoencoderKL

    from nti_lightning.models.compat import dtype_kwargs
    from nti_lightning.models.embedded import ASSETS_DIR

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        vae = AutoencoderKL.from_pretrained(ASSETS_DIR / "tiny" / "vae", **dtype_kwargs(torch.float32))
    assert vae.dtype == torch.float32
