"""nti_lightning: Null-text Inversion (Mokady et al., CVPR 2023) and Prompt-to-Prompt editing on Lightning.

The public names are imported on first use (``nti_lightning.invert`` pulls in torch and diffusers; ``nti
--help`` and ``nti status`` do not need them).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "invert": "nti_lightning.api",
    "reconstruct": "nti_lightning.api",
    "InversionConfig": "nti_lightning.config",
    "RunConfig": "nti_lightning.config",
    "load_config": "nti_lightning.config",
    "Inversion": "nti_lightning.store.inversion",
    "load_inversion": "nti_lightning.store.inversion",
    "save_inversion": "nti_lightning.store.inversion",
    "open_run": "nti_lightning.store.reader",
    "NTIModel": "nti_lightning.models",
    "load_model": "nti_lightning.models",
    "edit": "nti_lightning.p2p",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nti_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [*_EXPORTS, "__version__"]
