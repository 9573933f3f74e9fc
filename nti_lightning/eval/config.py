"""``nti eval`` settings: typed sections loaded by ``config.load_config(path, overrides, base=EvalConfig)``.

The model, inversion and trainer sections are ``nti invert``'s own (``config.ModelConfig``, ``InversionConfig``,
``TrainerConfig``: precision, devices, batch size "auto"); the command line's flags are aliases of keys here
(``eval.args.eval_overrides``) and ``key=value`` arguments set any of them. The parser is in ``eval.args`` (no
OmegaConf there, so ``nti --help`` stays light).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nti_lightning.config import InversionConfig, ModelConfig, TrainerConfig, check_shard, load_config
from nti_lightning.methods import METHODS

CROSS_REPLACE = 0.4
"""PIE-Bench's ``run_editing_p2p.py``: the source's cross-attention is injected in the first 40% of the steps."""
SELF_REPLACE = 0.6
"""PIE-Bench's ``run_editing_p2p.py``: self-attention in the first 60%."""
BLEND_REWEIGHT = 2.0
"""PIE-Bench: with a ``blended_word``, the target word's attention is also scaled by 2 (``eq_params``)."""
PIE_SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "pie_sample"
"""The bundled 10-entry sample in PIE-Bench's layout."""


@dataclass
class PieDataConfig:
    """The PIE-Bench-format folder and how array tasks split its entries."""

    dir: str = str(PIE_SAMPLE)
    """The folder with ``mapping_file.json`` and ``annotation_images/`` (the command's DIR argument): the real
    PIE-Bench, or the bundled sample ``nti_lightning/assets/pie_sample``."""
    limit: int | None = None
    """Only the first ``limit`` entries of the mapping file (quick looks); None: all."""
    shard_index: int = 0
    """This array task's share: entry k → task k mod num_shards, then rank (k div num_shards) mod world size
    (``run.folder.WorkerId``, as ``nti invert``)."""
    num_shards: int = 1
    """Array tasks splitting the entries (``data.num_shards=$SLURM_ARRAY_TASK_COUNT``)."""

    def __post_init__(self) -> None:
        check_shard(self.shard_index, self.num_shards)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit (--limit) must be >= 1, got {self.limit}")


@dataclass
class PieEditConfig:
    """The Prompt-to-Prompt edit PIE-Bench runs on every inversion (its ``run_editing_p2p.py``)."""

    cross_replace_steps: float = CROSS_REPLACE
    """Fraction of the steps in which the source's cross-attention is injected."""
    self_replace_steps: float = SELF_REPLACE
    """Fraction of the steps in which the source's self-attention is injected."""
    blend_reweight: float = BLEND_REWEIGHT
    """With a ``blended_word``: the scale of the target word's attention."""

    def __post_init__(self) -> None:
        for name in ("cross_replace_steps", "self_replace_steps"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"edit.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class MetricNetsConfig:
    """Local networks of the metrics; never downloaded. A metric whose network is None is skipped (one line)."""

    lpips: str | None = None
    """torchvision SqueezeNet-1.1 state dict for LPIPS (``squeezenet1_1-b8a52dc0.pth``)."""
    dino: str | None = None
    """transformers DINO ViT folder for the structure distance."""
    clip: str | None = None
    """transformers CLIPModel folder for the CLIP scores."""


@dataclass
class EvalOutputConfig:
    """What an evaluation writes."""

    dir: str = "outputs/eval"
    """Output folder (``--out``): run.json, config.yaml, the records (manifest*.jsonl), per_image.jsonl,
    summary.json, summary.md, psnr_vs_time.png, strips/, images/, logs/."""
    strips: bool = True
    """Write strips/<id>.png: source, then reconstruction and edit of each method."""
    progress_bar: bool = True
    """A progress bar on rank 0 when stderr is a terminal (pairs done of this worker's share)."""
    prefetch: int = 2
    """Images decoded ahead in a background thread, in units of the batch size; 0 = off."""

    def __post_init__(self) -> None:
        if self.prefetch < 0:
            raise ValueError(f"output.prefetch must be >= 0, got {self.prefetch}")


@dataclass
class EvalConfig:
    """One ``nti eval`` run over a PIE-Bench-format folder (``eval.pie``): every (image, method) pair once."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Inverters to compare (``InversionConfig.method``), in this order; ``inversion.method`` is not used."""
    model: ModelConfig = field(default_factory=ModelConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    """Every method's hyperparameters (PIE-Bench: T = 50, w = 7.5; NTI's N = 10). Seconds per image are its share
    of the UNet calls it took part in (``batch_size`` rows each; "auto" as ``nti invert``)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: PieDataConfig = field(default_factory=PieDataConfig)
    edit: PieEditConfig = field(default_factory=PieEditConfig)
    metrics: MetricNetsConfig = field(default_factory=MetricNetsConfig)
    output: EvalOutputConfig = field(default_factory=EvalOutputConfig)

    def __post_init__(self) -> None:
        self.methods = [m.strip() for m in self.methods if m.strip()]
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods lists a method twice: {','.join(self.methods)}")


def config_from_args(args) -> EvalConfig:
    """The run's settings: ``--config`` ← key=value ← flags (raises ``config.ConfigError``, a ValueError)."""
    from nti_lightning.eval.args import eval_overrides

    return load_config(getattr(args, "config", None), eval_overrides(args), base=EvalConfig)
