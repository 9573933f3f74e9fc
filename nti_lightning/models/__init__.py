"""Model loading: the embedded tiny default, local diffusers folders, single files, hub ids."""

from nti_lightning.models.loading import load_model
from nti_lightning.models.model import NTIModel, model_from_components

__all__ = ["NTIModel", "load_model", "model_from_components"]
