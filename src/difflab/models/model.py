"""A difflab model: the denoiser, the noise schedule it was trained with, and what it was made from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from difflab.diffusion.schedules import PREDICTIONS
from difflab.models.denoiser import Denoiser


@dataclass
class ModelInfo:
    """Saved as difflab.json next to the diffusers folders."""

    image_size: int
    channels: int
    data: str = ""
    class_names: list[str] | None = None
    base_model: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = 1

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelInfo:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class DiffusionModel:
    denoiser: Denoiser
    noise_schedule: Any  # diffusers DDPMScheduler: the forward process; samplers are built from its config
    info: ModelInfo

    @property
    def unet(self):
        return self.denoiser.unet

    @property
    def prediction(self) -> str:
        """Our name for what the network predicts: epsilon, v or x0."""
        by_diffusers_name = {v: k for k, v in PREDICTIONS.items()}
        return by_diffusers_name[self.noise_schedule.config.prediction_type]

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device) -> DiffusionModel:
        self.denoiser.to(device)
        return self
