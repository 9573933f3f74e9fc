"""``nti eval`` settings (a light module: no torch, so ``nti --help`` stays fast)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from nti_lightning.methods import METHODS

CROSS_REPLACE = 0.4
"""PIE-Bench's ``run_editing_p2p.py``: the source's cross-attention is injected in the first 40% of the steps."""
SELF_REPLACE = 0.6
"""PIE-Bench's ``run_editing_p2p.py``: self-attention in the first 60%."""
BLEND_REWEIGHT = 2.0
"""PIE-Bench: with a ``blended_word``, the target word's attention is also scaled by 2 (``eq_params``)."""


@dataclass
class EvalConfig:
    """One ``nti eval`` run over a PIE-Bench-format folder (``eval.pie``): every (image, method) pair once."""

    data: str
    """The folder with ``mapping_file.json`` and ``annotation_images/`` (the real PIE-Bench, or the bundled sample
    ``nti_lightning/assets/pie_sample``)."""
    out: str
    """Output folder: per_image.jsonl, summary.json, summary.md, psnr_vs_time.png, strips/, images/."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Inverters to compare (``InversionConfig.method``), in this order."""
    model: str = "tiny"
    """``model.spec`` of ``nti invert``: "tiny" (embedded), a diffusers folder or a single checkpoint."""
    config_dir: str | None = None
    """``model.config_dir`` of ``nti invert``: a single-file checkpoint's diffusers config folder (or an embedded
    name); needed offline."""
    device: str | None = None
    """torch device; None: cuda:LOCAL_RANK if CUDA is there, else cpu."""
    num_ddim_steps: int = 50
    """T of every method (PIE-Bench: 50)."""
    num_inner_steps: int = 10
    """N of NTI (the authors': 10)."""
    guidance_scale: float = 7.5
    """w of every method's reconstruction and edit (PIE-Bench: 7.5)."""
    image_size: int | None = None
    """Working resolution; None: the model's native size (512 SD1.x, 128 the tiny model). Metrics are taken at
    this size, with PIE's 512² masks resized (nearest)."""
    batch_size: int = 1
    """Rows per UNet call of the slot engine. 1 (default): an image's seconds are its own; above 1 they are its
    wall time in the engine, shared with the other images in flight (an upper bound)."""
    limit: int | None = None
    """Only the first ``limit`` entries of the mapping file (quick looks); None: all."""
    cross_replace_steps: float = CROSS_REPLACE
    self_replace_steps: float = SELF_REPLACE
    blend_reweight: float = BLEND_REWEIGHT
    lpips: str | None = None
    """Local torchvision SqueezeNet-1.1 state dict for LPIPS; None skips LPIPS (one log line). Never downloaded."""
    dino: str | None = None
    """Local transformers DINO ViT folder for the structure distance; None skips it."""
    clip: str | None = None
    """Local transformers CLIPModel folder for the CLIP scores; None skips them."""
    shard_index: int = 0
    """This job's shard (a job array), as ``data.shard_index`` of ``nti invert``."""
    num_shards: int = 1
    rank: int | None = None
    """This process's rank within the shard; None: RANK, else SLURM_PROCID, else 0."""
    world_size: int | None = None
    """Processes per shard; None: WORLD_SIZE, else SLURM_NTASKS, else 1."""
    strips: bool = True
    """Write strips/<id>.png: source, then reconstruction and edit of each method."""

    def __post_init__(self) -> None:
        self.methods = [m.strip() for m in self.methods if m.strip()]
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods lists a method twice: {','.join(self.methods)}")
        if self.rank is None:
            self.rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        if self.world_size is None:
            self.world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
        if not 0 <= self.shard_index < self.num_shards or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"shard {self.shard_index} of {self.num_shards}, rank {self.rank} of {self.world_size}: out of range"
            )
        if self.num_ddim_steps < 1 or self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("--steps, --batch-size and --limit must be >= 1")

    @property
    def worker(self) -> str:
        return f"shard{self.shard_index}.rank{self.rank}"


# ---------------------------------------------------------------------------------------------------------
# nti eval's arguments
# ---------------------------------------------------------------------------------------------------------

EVAL_USAGE = """Compare inverters on a PIE-Bench-format folder (mapping_file.json + annotation_images/): per image and
method invert, reconstruct, Prompt-to-Prompt edit as PIE-Bench, measure. Writes OUT/per_image.jsonl (one line
per image × method), summary.json, summary.md (PIE-Bench Table 1 columns), psnr_vs_time.png (with matplotlib),
strips/<id>.png. A rerun skips finished pairs; --shard-index/--num-shards and RANK/WORLD_SIZE (or SLURM_PROCID/
SLURM_NTASKS) split the images as `nti invert` does. Metrics needing networks read only local paths
(--lpips, --dino, --clip); without them they are skipped with one line. See docs/eval.md."""


def add_eval_subparser(subparsers):
    p = subparsers.add_parser("eval", help="compare inverters on a PIE-Bench-format folder", description=EVAL_USAGE)
    p.add_argument("data", help="folder with mapping_file.json (e.g. nti_lightning/assets/pie_sample)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    p.add_argument("--model", default="tiny", help="model spec (default: the embedded tiny model)")
    p.add_argument("--config-dir", default=None, help="a single-file checkpoint's diffusers config folder")
    p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps T of every method (default 50)")
    p.add_argument("--inner-steps", type=int, default=10, help="NTI's Adam steps per timestep N (default 10)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="w (default 7.5)")
    p.add_argument("--image-size", type=int, default=None, help="working size (default: the model's native)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per UNet call of the slot engine (default 1)")
    p.add_argument("--limit", type=int, default=None, help="only the first N entries")
    for name in ("lpips", "dino", "clip"):
        p.add_argument(f"--{name}", default=None, help=f"local path of the {name.upper()} network (else skipped)")
    p.add_argument("--shard-index", type=int, default=0, help="this job's shard (a SLURM array task)")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--no-strips", action="store_true", help="do not write strips/")
    p.add_argument("--overwrite", action="store_true", help="start over a folder evaluated with other settings")
    return p


def config_from_args(args) -> EvalConfig:
    return EvalConfig(
        data=args.data, out=args.out, methods=args.methods.split(","), model=args.model,
        config_dir=args.config_dir, device=args.device, num_ddim_steps=args.steps,
        num_inner_steps=args.inner_steps, guidance_scale=args.guidance_scale, image_size=args.image_size,
        batch_size=args.batch_size, limit=args.limit, lpips=args.lpips,
        dino=args.dino, clip=args.clip, shard_index=args.shard_index, num_shards=args.num_shards,
        strips=not args.no_strips,
    )  # fmt: skip
