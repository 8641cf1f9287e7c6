"""Fine-tuning: the one training loop, started from a pretrained model (course unit 2).

With `model.base` set (`difflab finetune --from MODEL`), the trainer loads that model instead of
building new weights. What the model decides (its network, noise schedule, conditioning, image size
and channels) is read into the run's settings, so the saved config.toml says what was trained and
runs again as it is; the data is fitted to the model (resized, and grey <-> RGB converted).
"""

from __future__ import annotations

import dataclasses
import logging

from difflab.config import TrainConfig
from difflab.data import ImageDataset, StreamedImages
from difflab.data.dataset import match_channels
from difflab.diffusion.samplers import check_sampler_steps
from difflab.errors import ConfigError, DataError, ModelError
from difflab.models.model import DiffusionModel, ModelInfo
from difflab.models.schedules import SCHEDULES

log = logging.getLogger("difflab")

SCHEDULE_NAMES = {diffusers_name: ours for ours, diffusers_name in SCHEDULES.items()}
BASE_PRESET = "(base model)"  # the network is the base model's, not a preset


def load_base(config: TrainConfig) -> DiffusionModel:
    """The pretrained model, in training mode, with one-line errors for a folder that is not one."""
    from difflab.storage.folder import load_model

    base = load_model(config.model.base, allow_pickle=config.model.allow_pickle, safety_checker=False)
    if base.latent:
        if base.variant is not None or base.prompts is None:
            raise ModelError(f"{config.model.base} is a {base.kind.pipeline}; difflab fine-tunes pixel-space models "
                             "(DDPMPipeline folders) and text-to-image ones (StableDiffusionPipeline folders), not "
                             "inpainting, depth or upscaling models")
        # the VAE stays as it is; the text encoder trains only when asked (as in diffusers' scripts)
        base.codec.vae.requires_grad_(False)
        base.prompts.text_encoder.requires_grad_(bool(config.model.train_text_encoder))
    if config.model.lora_rank:  # before the run folder is touched: a rank that cannot work is refused now
        from difflab.models.lora import check_attention, check_rank

        check_attention(base)  # says why a pixel model takes no LoRA
        check_rank(base, config.model.lora_rank, text_encoder=bool(config.model.train_text_encoder))
    base.denoiser.train()
    return base


def settings_from_base(config: TrainConfig, base: DiffusionModel) -> TrainConfig:
    """`config` with the settings the base model decides filled in from it."""
    info, schedule = base.info, base.noise_schedule.config
    for name, value in (("image_size", info.image_size), ("channels", info.channels)):
        given = getattr(config.data, name)
        if given is not None and given != value:
            raise ConfigError(f"[data] {name} = {given} does not fit {config.model.base}, which takes {value}; "
                              "leave it out: the images are converted to the model's")
    model = dataclasses.replace(
        config.model,
        preset=info.training.preset or BASE_PRESET,
        schedule=SCHEDULE_NAMES.get(schedule.beta_schedule, config.model.schedule),
        prediction=base.prediction,
        timesteps=schedule.num_train_timesteps,
        conditioning="text" if base.prompts is not None else "class" if info.class_names else "none",
    )
    if info.class_names:
        model.class_method = info.class_method
        model.class_embed_dim = info.class_embed_dim or config.model.class_embed_dim
    data = dataclasses.replace(config.data, image_size=info.image_size, channels=info.channels)
    # the grids' sampler steps must fit the base model's schedule
    check_sampler_steps(config.run.sample_steps, model.timesteps, config.run.sample_sampler, "--sample-steps")
    return dataclasses.replace(config, model=model, data=data)


def fit_data(data: ImageDataset | StreamedImages, config: TrainConfig) -> ImageDataset | StreamedImages:
    """The data (opened at the model's image size, in its own channels) in the model's channels
    (`config` has been through `settings_from_base`)."""
    want = config.data.channels
    if data.channels != want:
        colours = {1: "grey", 3: "RGB"}
        log.info("note: %s is %s and %s takes %s images; converting the images to %s", config.data.spec,
                 colours[data.channels], config.model.base, colours[want], colours[want])
        if isinstance(data, ImageDataset):
            data.images = match_channels(data.images, want)
        else:
            data.channels = want  # a folder read from disk decodes each image in these channels
    return data


def fine_tuned(base: DiffusionModel, config: TrainConfig, data) -> DiffusionModel:
    """The base model's network and noise schedule, described as a model of the new data."""
    names = base.info.class_names
    if base.prompts is not None:
        if not data.has_captions:
            raise DataError(f"{config.model.base} is a text-to-image model and {config.data.spec} has no captions: add "
                            "a metadata.jsonl (file_name, text) or IMAGE.txt files, or give labelled data a "
                            "--caption-template such as 'a photo of a {label}'")
        info = ModelInfo(base.info.image_size, 3, data=data.source, base_model=config.model.base)
        return dataclasses.replace(base, info=info)
    if names:
        if not data.has_labels:
            raise DataError(f"{config.model.base} is class-conditional ({len(names)} classes) and {config.data.spec} "
                            "has no labels; fine-tune it on labelled data (one sub-folder per class)")
        if len(data.class_names) != len(names):
            raise DataError(f"{config.model.base} has {len(names)} classes and {config.data.spec} has "
                            f"{len(data.class_names)}; fine-tune it on data with as many classes")
    info = ModelInfo(base.info.image_size, base.info.channels, data=data.source,
                     class_names=list(data.class_names) if names else None, class_method=base.info.class_method,
                     class_embed_dim=base.info.class_embed_dim, base_model=config.model.base)
    return DiffusionModel(base.denoiser, base.noise_schedule, info)
