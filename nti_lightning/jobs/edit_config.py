"""``nti edit``'s settings: typed sections loaded by ``config.load_config(path, overrides, base=EditRunConfig)``.

The command line's flags are aliases of these keys (``edit_args.edit_overrides``); ``key=value`` arguments set
any of them (``edit.batch_size=8``, ``data.shard_index=$SLURM_ARRAY_TASK_ID``). The ``edit`` section is
``edit_config.EditConfig``, every edit's defaults; the others matter to the batch form (``--edits``) only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from nti_lightning.config import TrainerConfig, check_shard
from nti_lightning.edit_config import EditConfig

JOB_FOLDER = re.compile(r"edits[A-Za-z0-9_.-]*")
"""Names a job folder may have inside the inverted run's folder: none of that run's own (images, logs, …)."""


@dataclass
class EditModelConfig:
    """The model the edits sample with."""

    spec: str | None = None
    """``model.spec`` of ``nti invert``; None: the inversion's own (its record's ``model_source``)."""
    config_dir: str | None = None
    """A single-file checkpoint's diffusers config folder; None: the one recorded in the inversion."""


@dataclass
class EditDataConfig:
    """Where the batch form's edits come from and how array tasks split them."""

    edits: str | None = None
    """The edits JSONL (``--edits``): one edit per line over the run's images."""
    shard_index: int = 0
    """This array task's share of the lines: line k (0-based, blank lines counted) → task k mod num_shards, then
    rank (k div num_shards) mod world size (``run.folder.WorkerId``, as ``nti invert``)."""
    num_shards: int = 1
    """Array tasks splitting the lines (``data.num_shards=$SLURM_ARRAY_TASK_COUNT``)."""

    def __post_init__(self) -> None:
        check_shard(self.shard_index, self.num_shards)


@dataclass
class EditOutputConfig:
    """Where the batch form reads and writes."""

    dir: str = "outputs/nti"
    """The ``nti invert`` output folder whose images are edited (the command's OUTPUT argument)."""
    folder: str = "edits"
    """The job's folder inside ``dir`` (its claim, ``run.json``, ``config.yaml``, records, logs, pictures): a name
    starting with "edits" (``edits-batch2``), so it is never one of the inverted run's own."""
    subdirs: bool = False
    """Put each image's edits under a two-hex-digit bucket, ``images/ab/<id>/`` (as ``output.subdirs`` of ``nti
    invert``), so no folder holds millions of entries."""
    results: str | None = None
    """The results JSONL written at the end (one line per line of the edits file: its latest record, or
    "pending"); None: ``<job folder>/results.jsonl`` (``--results``)."""

    def __post_init__(self) -> None:
        if not JOB_FOLDER.fullmatch(self.folder):
            raise ValueError(
                f"output.folder={self.folder!r} must be one folder name starting with 'edits' (letters, digits, "
                "'_', '.', '-'), e.g. edits-batch2"
            )


@dataclass
class EditRunConfig:
    """Everything one ``nti edit`` run needs."""

    edit: EditConfig = field(default_factory=EditConfig)
    model: EditModelConfig = field(default_factory=EditModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: EditDataConfig = field(default_factory=EditDataConfig)
    output: EditOutputConfig = field(default_factory=EditOutputConfig)
