"""Typed configuration: dataclasses → OmegaConf structured configs, merged with YAML and CLI ``key=value``.

Every field is documented; defaults are the authors' (Mokady et al. 2023, §4 and their notebook) where
the paper fixes them. Unknown keys are an error that names the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from nti_lightning.methods import METHODS
from nti_lightning.store.codec_names import CODECS, DEFAULT_CODEC, ZSTD_LEVEL

# ---------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which diffusion model to invert with."""

    spec: str = "tiny"
    """"tiny" (the embedded SD1-shaped default), "tiny-sd2-v" (the embedded SD2-shaped v-prediction model), a
    local diffusers folder (SD1.x / SD2.x, the family is detected), a single-file .safetensors/.ckpt
    checkpoint, or a hub id (only on machines that can reach a hub)."""
    config_dir: str | None = None
    """For a single-file checkpoint: a diffusers folder with the matching configs (needed offline)."""
    dtype: str = "float32"
    """Storage dtype of the frozen weights: float32, float16 or bfloat16. Mixed precision is
    ``trainer.precision``; the null embeddings are always float32."""
    compile: str = "none"
    """``torch.compile`` the UNet for ``nti invert``: "none", or a mode ("default", "reduce-overhead" = CUDA
    graphs, "max-autotune"). Costs a compile per process (≈110 s for the tiny model on a CPU core) and
    recompiles while early stopping shrinks batches; on CPU 1.2× per inner step but 1.04× end to end once
    compiled (README, Performance). Results equal the eager UNet's only to rounding."""

    def __post_init__(self) -> None:
        if self.compile not in ("none", "default", "reduce-overhead", "max-autotune"):
            raise ValueError(
                f"model.compile must be none, default, reduce-overhead or max-autotune, got {self.compile!r}"
            )


PROX_OPERATORS = ("l0", "l1")


@dataclass
class InversionConfig:
    """Inversion hyperparameters (Null-text Inversion's Algorithm 1 by default); defaults are the authors'."""

    method: str = "nti"
    """The inverter, each run by the same slot engine and giving the same record kind (``Inversion``):
    "nti" Null-text Inversion (Mokady et al. 2023, the default); "ddim" the DDIM-inversion pivot alone with
    the model's null ψ("") at every step; "npi" Negative-prompt Inversion (Miyake et al. 2023: ∅_t = ψ(P));
    "proxnpi" NPI + proximal guidance at edit time (Han et al. 2023, the ``prox_*`` fields); "direct" Direct
    Inversion (Ju et al. 2024: per-step corrections z*_{t−1} − z_{t−1} of the source branch, stored in the
    record). Only "nti" optimises (``num_inner_steps`` and the learning-rate fields apply to it alone)."""
    num_ddim_steps: int = 50
    """T, the number of DDIM steps (timesteps 981, 961, …, 1 for SD1.x)."""
    guidance_scale: float = 7.5
    """w, classifier-free guidance scale of the optimisation and of reconstruction/editing (line 5). The pivot
    (lines 3–4) always uses w = 1: the conditional branch only."""
    num_inner_steps: int = 10
    """N, Adam steps on ∅_t per timestep (0: no optimisation — DDIM inversion replayed with guidance w)."""
    learning_rate: float = 1e-2
    """Base Adam learning rate; outer step i uses learning_rate · (1 − i / lr_decay_horizon)."""
    lr_decay_horizon: int = 100
    """The literal 100 of the authors' schedule; must be ≥ num_ddim_steps, so that the last outer step
    (i = T − 1) still has a positive learning rate."""
    early_stop: bool = True
    """Stop the inner loop of an image once its loss < early_stop_epsilon + i · early_stop_slope."""
    early_stop_epsilon: float = 1e-5
    """ε of the early-stop test."""
    early_stop_slope: float = 2e-5
    """Per-outer-step growth of the early-stop threshold."""
    image_size: int | None = None
    """Side of the centre-cropped square input in pixels; None = the model's native size
    (unet.sample_size × VAE factor: 512 for SD1.x, 128 for the tiny model)."""
    batch_size: int | str = "auto"
    """Rows per UNet call of the continuous-batching engine (``slots.py``). "auto": 8 on CPU; on a GPU the
    largest power of two whose inner step fits in ~85% of free memory (one probe at start, at most 64).
    Per-image results equal inverting each image alone to float tolerance (bit for bit with batch_invariant)."""
    slots: int | None = None
    """Images in flight; None = 2 · batch_size − 1, the fewest with which every UNet call is full."""
    batch_invariant: bool = False
    """Reference mode: run every network call one image at a time inside the batched loop, so each image's
    numbers are bit-identical to inverting it alone (kernels round differently per batch size, and Adam's
    ε = 1e-8 turns ~1e-10 gradient noise on near-zero elements into ~1e-5 moves). No batching speed-up."""
    optimize: list[str] | None = None
    """Keys of the null conditioning Null-text Inversion optimises per timestep; None = the family's default
    (SD1.x / SD2.x: [prompt_embeds]; SDXL: [prompt_embeds, text_embeds] — the pooled embedding — and time_ids
    on request, 6 more numbers a step for no measurable cost). Keys the list leaves out stay at the model's null."""
    prox_operator: str = "l0"
    """method "proxnpi": the proximal operator on Δ = ε(C) − ε(∅) at edit time, "l0" or "l1" as the authors'
    code (Han et al. 2023; their "l0" is Δ − clamp(Δ, −τ, τ)). Defaults: PIE-Bench's ProxNPI run."""
    prox_quantile: float = 0.75
    """method "proxnpi": τ = this quantile of |Δ| over the edit batch (a negative value: τ = −value)."""
    prox_recon_t: int = 400
    """method "proxnpi": inversion guidance at timesteps t < prox_recon_t (negative: t > −value)."""
    prox_recon_lr: float = 1.0
    """method "proxnpi": z ← z − lr·(z − z*_{t−1})·(1 − edit mask) after each edit step (1: snap to z*)."""
    prox_dilate: int = 1
    """method "proxnpi": the edit mask (|prox(Δ)| > τ) is max-pool dilated by this many latent pixels."""

    def __post_init__(self) -> None:
        _check(self.method in METHODS, "inversion.method", self.method, f"must be one of {', '.join(METHODS)}")
        _check(self.prox_operator in PROX_OPERATORS, "inversion.prox_operator", self.prox_operator, "must be l0 or l1")
        _check(self.prox_dilate >= 0, "inversion.prox_dilate", self.prox_dilate, "must be >= 0")
        _check(self.num_ddim_steps >= 1, "inversion.num_ddim_steps", self.num_ddim_steps, "must be >= 1")
        _check(self.num_inner_steps >= 0, "inversion.num_inner_steps", self.num_inner_steps, "must be >= 0")
        _check(self.learning_rate > 0, "inversion.learning_rate", self.learning_rate, "must be > 0")
        _check(self.guidance_scale >= 0, "inversion.guidance_scale", self.guidance_scale, "must be >= 0")
        _check(self.early_stop_epsilon >= 0, "inversion.early_stop_epsilon", self.early_stop_epsilon, "must be >= 0")
        _check(self.early_stop_slope >= 0, "inversion.early_stop_slope", self.early_stop_slope, "must be >= 0")
        _check(
            self.lr_decay_horizon >= self.num_ddim_steps,
            "inversion.lr_decay_horizon",
            self.lr_decay_horizon,
            f"must be >= num_ddim_steps = {self.num_ddim_steps}, otherwise the learning rate reaches zero or "
            "turns negative",
        )
        if isinstance(self.batch_size, str):
            _check(self.batch_size == "auto", "inversion.batch_size", self.batch_size, 'must be "auto" or an integer')
        else:
            _check(self.batch_size >= 1, "inversion.batch_size", self.batch_size, "must be >= 1")
        if self.slots is not None:
            _check(self.slots >= 1, "inversion.slots", self.slots, "must be >= 1")
        if self.image_size is not None:
            _check(
                self.image_size >= 8 and self.image_size % 8 == 0,
                "inversion.image_size",
                self.image_size,
                "must be a positive multiple of 8",
            )


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} {rule}")


def check_shard(shard_index: int, num_shards: int) -> None:
    """The split of every job's data config: this task is shard ``shard_index`` of ``num_shards``."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"data.shard_index must be in [0, data.num_shards), got {shard_index} of {num_shards}")


CPU_BATCH_SIZE = 8
"""``batch_size="auto"`` on a CPU: measured fastest of 1/4/8/16 on the tiny model (docs/performance.md)."""


def resolve_batch_size(batch_size: int | str, device=None) -> int:
    """An int as is; "auto" → ``CPU_BATCH_SIZE`` on a CPU (a GPU's is probed by ``batch_probe.probe_batch_size``)."""
    if batch_size != "auto":
        return int(batch_size)
    return CPU_BATCH_SIZE


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
    precision: str = "auto"
    """"auto", "32-true", "bf16-mixed" or "16-mixed". "auto" = the fastest that loses < 0.5 dB PSNR against fp32 on the
    tiny model (docs/scaleout.md, Precision): 16-mixed on a CUDA GPU, 32-true on CPU; ``config.yaml`` and
    ``run.json`` record the resolved value. Null embeddings stay float32 in every mode. "16-mixed" uses a GradScaler
    (skipped steps are not charged to N and are reported per image); on CPU it is given to Fabric as an explicit fp16
    plugin, because Fabric would otherwise silently run bf16."""
    ddp_timeout_s: int = 1800
    """Timeout of the process group's collectives in seconds (only the start-up barrier uses one)."""

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "32-true", "32", "bf16-mixed", "16-mixed"):
            raise ValueError(
                f"trainer.precision must be auto, 32-true, bf16-mixed or 16-mixed, got {self.precision!r} "
                "(bf16-true/16-true would cast the null embeddings too, which breaks Adam)"
            )
        if self.strategy not in ("auto", "ddp", "ddp_spawn"):
            raise ValueError(f"trainer.strategy must be auto, ddp or ddp_spawn, got {self.strategy!r}")


@dataclass
class DataConfig:
    """Where the images and captions of a dataset run come from."""

    images: list[str] = field(default_factory=list)
    """Image files, folders (searched recursively, sorted) and/or list files. A ``.jsonl``/``.csv`` file is a
    list of images read line by line: rows with ``image`` (a path, relative to the list file's folder) and an
    optional ``prompt`` that wins over ``captions``; a ``.txt`` file has one path per line. Lists are the way
    to feed millions of images (nothing is scanned or held in memory); a bad row is recorded as failed with
    the list file and line. Dataset shards are read in place: WebDataset ``.tar`` shards (img2dataset's
    ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``), brace patterns (``shards/{00000..00999}.tar``), ``.parquet``
    files (an image column of ``{bytes, path}`` structs or bytes) and folders of them; a sample's id is
    ``<shard name>/<key>`` (``nti_lightning.data.shards``). Empty = the bundled sample images."""
    captions: str | None = None
    """JSONL or CSV with columns ``image`` and ``prompt``; None = a captions file next to the samples. For
    shard samples a row matches the sample's id or key, and wins over the sample's own caption."""
    caption_column: str | None = None
    """Where a shard sample's caption is: a Parquet column, or for a tar sample a member extension
    (``KEY.<name>``) or a field of its ``KEY.json``. None = the first of ``prompt``, ``caption``, ``text`` that
    exists (for tar after ``KEY.txt``)."""
    image_column: str | None = None
    """The image column of Parquet shards; None = ``image``, else the only column of ``{bytes, path}``
    structs or bytes (several such columns: set this)."""
    default_prompt: str | None = None
    """Prompt for images without a caption row; None = such images fail with a clear message."""
    shard_index: int = 0
    """This job's shard of the dataset when independent jobs split it (a SLURM job array:
    ``data.shard_index=$SLURM_ARRAY_TASK_ID``). Within a shard the images are split again across ranks."""
    num_shards: int = 1
    """Number of independent jobs splitting the dataset (``data.num_shards=$SLURM_ARRAY_TASK_COUNT``).
    Image k goes to shard k mod num_shards, then to rank (k div num_shards) mod world size."""

    def __post_init__(self) -> None:
        check_shard(self.shard_index, self.num_shards)


@dataclass
class OutputConfig:
    """What a dataset run writes."""

    dir: str = "outputs/nti"
    """Output folder: manifest.jsonl, config.yaml and one sub-folder per image."""
    save_strip: bool = True
    """Write input | VAE round trip | DDIM w=7.5 without NTI | NTI reconstruction side by side (the VAE
    round trip is the best any latent inversion can reach: judge NTI against it)."""
    compute_baseline: bool = True
    """Also reconstruct without NTI (DDIM inversion + w) for the strip and the metrics table."""
    checkpoint_every_s: float = 300.0
    """Save the worker's whole state (every in-flight image's ∅_t so far, z̄_t, Adam moments, the stream
    position) to ``checkpoints/`` after a UNet call at least this many seconds after the last save, so a
    killed run resumes where it was, bit for bit; 0 = after every UNet call (tests); a stop signal always
    saves. Finished images are always saved and skipped on a rerun."""
    subdirs: bool = False
    """Put each image's folder under a two-hex-digit bucket, ``OUTPUT/ab/<id>/`` (ab from a hash of the id),
    so no folder holds millions of entries."""
    logger: str = "csv"
    """"csv": per-timestep loss and inner-step counts through Lightning's CSVLogger in ``logs/`` (rank 0;
    every rank also writes ``logs/rank{r}.log``); "tensorboard": the same through Lightning's TensorBoardLogger
    when ``tensorboard`` or ``tensorboardX`` is installed (else CSV, with a warning in the log); "none": no
    metrics logger."""
    progress_bar: bool = True
    """A progress bar on rank 0 (images done/total of its shard, images per hour, ETA, timestep, inner steps of
    the timestep); off with ``--quiet``."""
    requeue: bool = True
    """Under SLURM, after a preemption signal rank 0 runs ``scontrol requeue`` for this job."""
    prefetch: int = 2
    """Images decoded ahead in a background thread, in units of the batch size; 0 = off."""
    codec: str = DEFAULT_CODEC
    """How ``inversion.safetensors`` stores ∅_t (docs/storage.md): "bf16-delta-zstd" (the default: bf16,
    integer delta along t, zstd; files 4.6–5.9× smaller than fp32 at ≤ 0.034 dB of NTI reconstruction PSNR on
    the tiny models, 4.46× for SD1.5-shaped ∅_t that never early-stop), "fp32-delta-zstd" exact and ~1.4×
    smaller, "fp32" the raw format-1 file; also the other "{fp32,fp16,bf16}[-xor|-delta]-zstd". Everything else
    in the record stays exact."""
    codec_level: int = ZSTD_LEVEL
    """The codecs' zstd level, 1–22 (reading does not depend on it): 1, the default, encodes an SD1.5 record's
    ∅_t in ~10 ms on one core; 10 is 0.6–5 % smaller at 6–10× the time, 19 4–11 % at 40–75× (docs/storage.md)."""
    layout: str = "auto"
    """Where the records go (docs/scaleout.md). "folders": one folder per image under ``images/`` with
    inversion.safetensors, meta.json, reconstruction.png and strip.png. "shards": per worker, rolling WebDataset
    tar shards ``shards/<worker>-<n>.tar`` of ``<key>.inversion.safetensors`` + ``<key>.json`` records, each with
    an id → offset index beside it; PNGs only for a sample and for images worth a look (``sample_images``,
    ``flag_psnr_drop``) under ``samples/``; read back with ``nti_lightning.open_run``. "auto": the layout the
    folder already has, else "shards" above ``run.layout.AUTO_SHARDS_ABOVE`` (10,000) images, else "folders"."""
    shard_max_bytes: int = 1 << 30
    """``shards`` layout: a shard is finished before a group of records would take it past this size, once it
    holds ``shard_min_images``."""
    shard_max_images: int = 10_000
    """``shards`` layout: … or past this many records."""
    shard_min_images: int = 256
    """``shards`` layout: no shard is finished for its size before it holds this many records, so that a run
    writes fewer than 0.01 files per image whatever a record weighs (2 files a shard: 1 GiB holds ~500 of
    SD1.5's default records, only 89 of its fp32 ones; SDXL's fp32 shards grow to ~8 GB)."""
    sample_images: int = 64
    """``shards`` layout: the first this many images of each worker get reconstruction.png and strip.png in
    ``samples/<worker>/`` (the ``folders`` layout writes them for every image)."""
    flag_psnr_drop: float = 6.0
    """``shards`` layout: an image whose reconstruction PSNR against the VAE round trip is this many dB below
    the median of the worker's last 1,000 images (once it has 32), or not finite, is flagged in its record
    (``flagged``) and gets its PNGs too; 0 = off."""
    flagged_images: int = 1000
    """``shards`` layout: at most this many flagged images per worker get PNGs (every one is flagged in the
    manifest)."""

    def __post_init__(self) -> None:
        if self.checkpoint_every_s < 0:
            raise ValueError(f"output.checkpoint_every_s must be >= 0, got {self.checkpoint_every_s}")
        if self.logger not in ("csv", "tensorboard", "none"):
            raise ValueError(f"output.logger must be csv, tensorboard or none, got {self.logger!r}")
        if self.prefetch < 0:
            raise ValueError(f"output.prefetch must be >= 0, got {self.prefetch}")
        if self.codec not in CODECS:
            raise ValueError(f"output.codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if not 1 <= self.codec_level <= 22:
            raise ValueError(f"output.codec_level must be a zstd level from 1 to 22, got {self.codec_level}")
        if self.layout not in ("auto", "folders", "shards"):
            raise ValueError(f"output.layout must be auto, folders or shards, got {self.layout!r}")
        for name in ("shard_max_bytes", "shard_max_images", "shard_min_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"output.{name} must be >= 1, got {getattr(self, name)}")
        if self.shard_min_images > self.shard_max_images:
            raise ValueError(
                f"output.shard_min_images ({self.shard_min_images}) must be <= output.shard_max_images "
                f"({self.shard_max_images})"
            )
        for name in ("sample_images", "flag_psnr_drop", "flagged_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"output.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class RunConfig:
    """Everything one ``nti invert`` run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ---------------------------------------------------------------------------------------------------------
# Loading and merging
# ---------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


PACKAGED_CONFIGS: Path = Path(__file__).resolve().parent / "configs"
"""The YAML configs shipped in the package (``configs/`` of a checkout links here): paper, fast_cpu, sd2, …"""


def packaged_configs() -> list[str]:
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file, or the name of a packaged config ("paper" or "paper.yaml", found in ``PACKAGED_CONFIGS``,
    so ``--config paper`` works from an installed wheel). Raises ``ConfigError`` naming what exists."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent == Path("."):
        packaged = PACKAGED_CONFIGS / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
        if packaged.is_file():
            return packaged
    raise ConfigError(
        f"config file {path} does not exist (packaged configs, usable by name: {', '.join(packaged_configs())})"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: type = RunConfig) -> Any:
    """Schema ← YAML file (a path or a packaged config's name) ← dotlist overrides (``inversion.num_inner_steps=5``);
    returns a ``base`` object.

    Unknown keys, wrong types and failed ``__post_init__`` checks raise ``ConfigError`` naming the key.
    """
    merged = OmegaConf.structured(base)
    if path is not None:
        path = resolve_config_path(path)
        merged = _blamed(f" in {path}", lambda: OmegaConf.merge(merged, OmegaConf.load(path)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        override = " (a key=value override)"
        merged = _blamed(override, lambda: OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides))))
    return _blamed("", lambda: OmegaConf.to_object(merged))


def _blamed(where: str, step: Callable[[], Any]) -> Any:
    """``step()``, an OmegaConf error in it raised as a ``ConfigError`` naming ``where`` the bad value came from:
    the config file, or the command line's overrides."""
    try:
        return step()
    except (ConfigAttributeError, ConfigKeyError, ValidationError) as e:
        msg = str(e.msg if hasattr(e, "msg") else e).strip().splitlines()[0]
        key = getattr(e, "full_key", None)
        raise ConfigError(f"invalid configuration{where}: {key + ': ' if key else ''}{msg}") from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def config_to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def apply_overrides(cfg: InversionConfig, **overrides: Any) -> InversionConfig:
    """Returns a copy of ``cfg`` with flat field overrides (the Python API's ``**overrides``)."""
    known = {f.name for f in fields(InversionConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown inversion option(s) {unknown}; known: {sorted(known)}")
    return InversionConfig(**{**asdict(cfg), **overrides})
