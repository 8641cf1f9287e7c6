"""A difflab model: the denoiser, the noise schedule it was trained with, and what it was made from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from difflab.diffusion.schedules import PREDICTIONS
from difflab.errors import ModelError
from difflab.models.denoiser import Denoiser


@dataclass
class ModelInfo:
    """Saved as difflab.json next to the diffusers folders."""

    image_size: int
    channels: int
    data: str = ""
    class_names: list[str] | None = None  # set for class-conditional models
    class_method: str | None = None  # "embedding" or "channels" (see models/denoiser.py)
    class_embed_dim: int | None = None  # width of the "channels" class embedding
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
    def class_names(self) -> list[str] | None:
        return self.info.class_names if self.denoiser.num_classes else None

    def class_indices(self, choice: str) -> list[int]:
        """'all', or comma-separated class names or indices -> class indices."""
        names = self.class_names
        if not names:
            raise ModelError("this model is unconditional; classes need a class-conditional model "
                             "(train one with --conditioning class)")
        if choice == "all":
            return list(range(len(names)))
        indices = []
        for item in (part.strip() for part in choice.split(",")):
            if item in names:
                indices.append(names.index(item))
            elif item.lstrip("-").isdigit() and 0 <= int(item) < len(names):
                indices.append(int(item))
            else:
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise ModelError(f"class {item!r} does not exist: this model has {len(names)} classes, "
                                 f"0-{len(names) - 1} ({shown})")
        return indices

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
