"""Typed configuration: dataclasses → OmegaConf structured configs, merged with YAML and CLI ``key=value``.

Every field is documented; defaults are the authors' (Mokady et al. 2023, §4 and their notebook) where
the paper fixes them. Unknown keys are an error that names the key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

# ---------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which diffusion model to invert with."""

    spec: str = "tiny"
    """"tiny" (the embedded default), a local diffusers folder, a single-file .safetensors/.ckpt checkpoint,
    or a hub id (only on machines that can reach a hub)."""
    dtype: str = "float32"
    """Storage dtype of the frozen weights: float32, float16 or bfloat16. Mixed precision is
    ``trainer.precision``; the null embeddings are always float32."""


@dataclass
class InversionConfig:
    """Null-text Inversion hyperparameters (Algorithm 1); defaults are the authors'."""

    num_ddim_steps: int = 50
    """T, the number of DDIM steps (timesteps 981, 961, …, 1 for SD1.x)."""
    guidance_scale: float = 7.5
    """w, classifier-free guidance scale of the optimisation and of reconstruction/editing."""
    pivot_guidance_scale: float = 1.0
    """Guidance of the pivotal DDIM inversion (Algorithm 1, line 3: w = 1 — conditional branch only)."""
    num_inner_steps: int = 10
    """N, Adam steps on ∅_t per timestep."""
    learning_rate: float = 1e-2
    """Base Adam learning rate; outer step i uses learning_rate · (1 − i / lr_decay_horizon)."""
    lr_decay_horizon: int = 100
    """The literal 100 of the authors' schedule; must exceed num_ddim_steps."""
    early_stop: bool = True
    """Stop the inner loop of an image once its loss < early_stop_epsilon + i · early_stop_slope."""
    early_stop_epsilon: float = 1e-5
    """ε of the early-stop test."""
    early_stop_slope: float = 2e-5
    """Per-outer-step growth of the early-stop threshold."""
    image_size: int | None = None
    """Side of the centre-cropped square input in pixels; None = the model's native size
    (unet.sample_size × VAE factor: 512 for SD1.x, 128 for the tiny model)."""
    batch_size: int = 1
    """Images per UNet call. Per-image results equal inverting each image alone (to float tolerance)."""
    batch_invariant: bool = False
    """Reference mode: run every network call one image at a time inside the batched loop, so each image's
    numbers are bit-identical to inverting it alone (kernels round differently per batch size, and Adam's
    ε = 1e-8 turns ~1e-10 gradient noise on near-zero elements into ~1e-5 moves). No batching speed-up."""
    skip_redundant_unet_calls: bool = True
    """Reuse the conditional prediction after the inner loop (one UNet call fewer per timestep)."""

    def __post_init__(self) -> None:
        if self.num_ddim_steps < 1:
            raise ValueError(f"inversion.num_ddim_steps must be >= 1, got {self.num_ddim_steps}")
        if self.num_inner_steps < 0:
            raise ValueError(f"inversion.num_inner_steps must be >= 0, got {self.num_inner_steps}")
        if self.lr_decay_horizon <= self.num_ddim_steps - 1:
            raise ValueError(
                f"inversion.lr_decay_horizon={self.lr_decay_horizon} must exceed num_ddim_steps - 1 = "
                f"{self.num_ddim_steps - 1}, otherwise the learning rate reaches zero or turns negative"
            )
        if self.batch_size < 1:
            raise ValueError(f"inversion.batch_size must be >= 1, got {self.batch_size}")
        if self.image_size is not None and (self.image_size < 8 or self.image_size % 8):
            raise ValueError(f"inversion.image_size must be a positive multiple of 8, got {self.image_size}")


@dataclass
class TrainerConfig:
    """Lightning Fabric launch settings (devices, nodes, precision)."""

    accelerator: str = "auto"
    """"cpu", "cuda", "gpu", "mps" or "auto"."""
    devices: Any = 1
    """Devices per node (int, list of indices, or "auto")."""
    num_nodes: int = 1
    """Nodes in the job (SLURM/torchrun set the rank environment)."""
    strategy: str = "auto"
    """"auto", "ddp" or "ddp_spawn". Gradients are never averaged across ranks: each rank inverts its own images."""
    precision: str = "32-true"
    """"32-true", "bf16-mixed" or "16-mixed". Null embeddings stay float32 in every mode."""


@dataclass
class DataConfig:
    """Where the images and captions of a dataset run come from."""

    images: list[str] = field(default_factory=list)
    """Image files and/or folders (searched recursively). Empty = the bundled sample images."""
    captions: str | None = None
    """JSONL or CSV with columns ``image`` and ``prompt``; None = a captions file next to the samples."""
    default_prompt: str | None = None
    """Prompt for images without a caption row; None = such images fail with a clear message."""


@dataclass
class OutputConfig:
    """What a dataset run writes."""

    dir: str = "outputs/nti"
    """Output folder: manifest.jsonl, config.yaml and one sub-folder per image."""
    save_strip: bool = True
    """Write input | DDIM w=7.5 without NTI | NTI reconstruction side by side."""
    compute_baseline: bool = True
    """Also reconstruct without NTI (DDIM inversion + w) for the strip and the metrics table."""


@dataclass
class RunConfig:
    """Everything one ``nti invert`` run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0
    """Seed for anything random (nothing in Algorithm 1 is; kept for reproducible extensions)."""


# ---------------------------------------------------------------------------------------------------------
# Loading and merging
# ---------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: type = RunConfig) -> Any:
    """Schema ← YAML file ← dotlist overrides (``inversion.num_inner_steps=5``); returns a ``base`` object.

    Unknown keys, wrong types and failed ``__post_init__`` checks raise ``ConfigError`` naming the key.
    """
    schema = OmegaConf.structured(base)
    sources = []
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            sources.append(OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got {bad}")
            sources.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(schema, *sources)
        obj = OmegaConf.to_object(merged)
    except (ConfigAttributeError, ConfigKeyError, ValidationError) as e:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid configuration{where}: {e.msg if hasattr(e, 'msg') else e}") from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    return obj


def config_to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def apply_overrides(cfg: InversionConfig, **overrides: Any) -> InversionConfig:
    """Returns a copy of ``cfg`` with flat field overrides (the Python API's ``**overrides``)."""
    known = {f.name for f in fields(InversionConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown inversion option(s) {unknown}; known: {sorted(known)}")
    return InversionConfig(**{**asdict(cfg), **overrides})
