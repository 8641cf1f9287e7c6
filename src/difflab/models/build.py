"""A new, untrained model from a config."""

from __future__ import annotations

import torch

from difflab.diffusion.schedules import noise_scheduler
from difflab.models.denoiser import Denoiser
from difflab.models.model import DiffusionModel, ModelInfo
from difflab.models.presets import build_unet


def build_model(model_config, image_size: int, channels: int, data_source: str, seed: int) -> DiffusionModel:
    with torch.random.fork_rng():  # seeded weights, without touching the caller's global RNG
        torch.manual_seed(seed)
        unet = build_unet(model_config.preset, image_size, channels)
    schedule = noise_scheduler(model_config.schedule, model_config.prediction, model_config.timesteps)
    return DiffusionModel(Denoiser(unet), schedule, ModelInfo(image_size, channels, data=data_source))
