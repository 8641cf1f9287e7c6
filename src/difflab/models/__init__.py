"""Model presets, the denoiser with its conditioning doors, and the model container."""

from difflab.models.model import DiffusionModel, ModelInfo

__all__ = ["DiffusionModel", "ModelInfo"]
