"""nti_lightning: Null-text Inversion (Mokady et al., CVPR 2023) and Prompt-to-Prompt editing on Lightning."""

__version__ = "0.1.0"

from nti_lightning.api import invert, reconstruct  # noqa: E402
from nti_lightning.config import InversionConfig, RunConfig, load_config  # noqa: E402
from nti_lightning.inversion import Inversion, load_inversion, save_inversion  # noqa: E402
from nti_lightning.models import NTIModel, load_model  # noqa: E402
from nti_lightning.p2p import edit  # noqa: E402

__all__ = [
    "Inversion",
    "edit",
    "InversionConfig",
    "NTIModel",
    "RunConfig",
    "invert",
    "load_config",
    "load_inversion",
    "load_model",
    "reconstruct",
    "save_inversion",
    "__version__",
]
