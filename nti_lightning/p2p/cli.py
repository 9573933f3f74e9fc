"""``nti edit INVERSION --target ...``: one Prompt-to-Prompt edit of one inversion (the usage, shown by ``nti edit
--help``, and the argument parser live in ``nti_lightning.edit_args``, so that ``nti --help`` stays light; the
batch form ``nti edit OUTPUT --edits FILE`` is the job ``jobs.edit``).

The edit is sampled with the run's ``EditConfig`` and written through ``p2p.outputs.save_edit`` (the edit, its
labelled strip, its attention figure, its settings JSON) under a free name.
"""

from __future__ import annotations

from pathlib import Path

from nti_lightning.edit_config import EditConfig, parse_assignments
from nti_lightning.p2p.alignment import AlignmentError, WordNotInPromptError
from nti_lightning.p2p.edit import EditSpec, edit_batch
from nti_lightning.p2p.figures import input_image
from nti_lightning.p2p.outputs import save_edit, settings_record, slug
from nti_lightning.store.inversion import Inversion, load_inversion
from nti_lightning.text import PromptError

EXIT_USAGE_ERROR = 2
EDIT_ERRORS = (AlignmentError, WordNotInPromptError, PromptError, ValueError, FileNotFoundError)
"""What a user can fix: a message and exit 2 (a line of an edits file: recorded as failed, the others go on)."""


def model_args_for(meta: dict, spec: str | None, config_dir: str | None) -> tuple[str, str | None]:
    """(spec, config_dir) to load for an inversion: the user's ``--model`` / ``--config-dir`` where given, else
    the record's ``model_source`` / ``model_config_dir`` (the config folder of a single-file checkpoint), else
    the tiny model."""
    return spec or meta.get("model_source") or "tiny", config_dir or meta.get("model_config_dir")


def load_model_for(inv: Inversion, spec: str | None, device: str | None, config_dir: str | None = None):
    import torch

    from nti_lightning.models import load_model

    source, config_dir = model_args_for(inv.meta, spec, config_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(source, device=device, config_dir=config_dir)


def run_single(args, config: EditConfig, spec: str | None = None, config_dir: str | None = None) -> int:
    """One edit, its files in ``--output`` (default: beside the inversion); ``spec`` / ``config_dir``: the model
    settings (``model.spec`` / ``model.config_dir``; None: the inversion's own)."""
    # 1. The inversion and its model (load_inversion checks they match)
    inv = load_inversion(args.inversion)
    model = load_model_for(inv, spec, args.device, config_dir)
    inv = load_inversion(args.inversion, model)
    # 2. The edit
    spec_ = EditSpec(
        target=args.target,
        mode=config.mode,
        cross_replace_steps=config.cross_replace,
        self_replace_steps=config.self_replace,
        blend_words=args.blend,
        reweight=parse_assignments(args.reweight, "--reweight") or None,
    )
    result = sample_edits(model, inv, [spec_], config)
    # 3. Its files
    folder = Path(args.output) if args.output else Path(args.inversion).resolve().parent / "edits"
    record = settings_record(Path(args.inversion), inv, model, spec_, config, result, 1)
    paths = save_edit(folder, slug(args.target), result, 1, input_image(model, inv), record, config)
    print(f"{result.modes[0] or 'no edit'}: {inv.prompt!r} → {args.target!r}")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


def sample_edits(model, inv: Inversion, specs: list[EditSpec], config: EditConfig, runtime=None):
    """``edit_batch`` with the run's settings (the specs carry the per-edit ones); ``runtime``: the worker's
    (device, precision) in the batch form."""
    return edit_batch(
        model,
        inv,
        specs,
        config.guidance_scale,
        return_attention=config.attention,
        runtime=runtime,
        local_blend_start=config.local_blend_start,
        local_blend_threshold=config.local_blend_threshold,
    )


__all__ = ["EDIT_ERRORS", "load_model_for", "run_single", "sample_edits"]
