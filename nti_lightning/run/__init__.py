"""The dataset run behind ``nti invert``: every image of a folder or list inverted once, resumable, sharded.

``launch`` (Fabric and rank processes) → ``worker`` (one rank's shard through the slot engine) with
``items`` (the stream), ``outputs`` (files per image), ``manifest`` (one JSON row per image),
``checkpoint`` (the engine's state), ``lock`` (one run per folder), ``signals`` (stop and resume).
"""

from nti_lightning.run.identity import OutputMismatchError
from nti_lightning.run.launch import RankFailedError, run_inversion
from nti_lightning.run.lock import OutputLockedError
from nti_lightning.run.manifest import ManifestIndex, read_manifest
from nti_lightning.run.outputs import RunSummary, format_header, format_row
from nti_lightning.run.signals import EXIT_PREEMPTED, StopFlag

__all__ = [
    "EXIT_PREEMPTED",
    "ManifestIndex",
    "OutputLockedError",
    "OutputMismatchError",
    "RankFailedError",
    "RunSummary",
    "StopFlag",
    "format_header",
    "format_row",
    "read_manifest",
    "run_inversion",
]
