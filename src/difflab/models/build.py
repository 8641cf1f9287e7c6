"""A new, untrained model from a config; and the denoiser of a saved one."""

from __future__ import annotations

import torch

from difflab.models.denoiser import Denoiser
from difflab.models.model import DiffusionModel, ModelInfo
from difflab.models.presets import build_unet
from difflab.models.schedules import noise_scheduler


def build_model(model_config, image_size: int, channels: int, data_source: str, seed: int,
                class_names: list[str] | None = None) -> DiffusionModel:
    """`class_names` (with `model_config.conditioning == "class"`) makes a class-conditional model."""
    conditional = model_config.conditioning == "class"
    info = ModelInfo(image_size, channels, data=data_source)
    if conditional:
        info.class_names = list(class_names)
        info.class_method = model_config.class_method
        info.class_embed_dim = model_config.class_embed_dim if info.class_method == "channels" else None
    with torch.random.fork_rng():  # seeded weights, without touching the caller's global RNG
        torch.manual_seed(seed)
        unet = build_unet(model_config.preset, image_size, unet_in_channels(info), channels,
                          **unet_class_settings(info))
        denoiser = denoiser_for(unet, info)
    schedule = noise_scheduler(model_config.schedule, model_config.prediction, model_config.timesteps)
    return DiffusionModel(denoiser, schedule, info)


def unet_in_channels(info: ModelInfo) -> int:
    return info.channels + (info.class_embed_dim if info.class_method == "channels" else 0)


def unet_class_settings(info: ModelInfo) -> dict:
    """The UNet's own class door: one embedding per class plus the null class."""
    return {"num_class_embeds": len(info.class_names) + 1} if info.class_method == "embedding" else {}


def denoiser_for(unet, info: ModelInfo) -> Denoiser:
    if not info.class_names:
        return Denoiser(unet)
    return Denoiser(unet, len(info.class_names), info.class_method, info.class_embed_dim or 0)
