"""The run's settings and its data, decided together before anything is built.

The data fills in the image size and channels left to it; with --from, the pretrained model decides the
network, schedule, image size and channels, and the data is fitted to it; a data maker (DreamBooth's,
textual inversion's) makes the data once the run folder is ready. Text runs add their grids' prompts
and the timestep shift left to difflab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from difflab.config import TEXT_TIMESTEP_SHIFT, VAE_SHARE, VAE_STEPS, TrainConfig
from difflab.data import ImageDataset, open_dataset
from difflab.errors import ConfigError, DataError
from difflab.models.model import DiffusionModel
from difflab.models.prompt_syntax import parse_prompt
from difflab.models.text_presets import TEXT_PRESETS
from difflab.training import finetune
from difflab.training.run_folder import RunFolder
from difflab.training.text_model import PIXEL_SPACE

# Training data made for the run instead of opened by its spec (DreamBooth's instance and class images):
# called with the settled config, the pretrained model and the run folder (ready to write in, say to cache
# generated images), it returns the dataset, captions (and loss groups) included.
DataMaker = Callable[[TrainConfig, DiffusionModel, RunFolder], ImageDataset]


def resolve_data_settings(config: TrainConfig, data: ImageDataset) -> TrainConfig:
    """Fill in what was left to the data (image size, channels), so the saved config is complete."""
    return dataclasses.replace(config, data=dataclasses.replace(
        config.data, image_size=data.image_size, channels=data.channels))


def settle_settings(config: TrainConfig, made_data: bool = False
                    ) -> tuple[TrainConfig, ImageDataset | None, DiffusionModel | None]:
    """The run's complete settings, its data and (fine-tuning) the pretrained model. They are decided
    together: the data fills in the image size and channels left to it; with --from, the pretrained
    model decides the network, schedule, image size and channels, and the data is fitted to it.
    `made_data`: the data comes from a DataMaker once the run folder is ready (None is returned for it)."""
    if config.run.sample_prompts is not None:
        validation_prompts(config.run, None)  # an empty --sample-prompts is refused before any work
    config, data, base = settings_and_data(config, made_data)
    return resolve_vae_budget(resolve_timestep_shift(resolve_pixel_space(config))), data, base


def resolve_pixel_space(config: TrainConfig) -> TrainConfig:
    """A new text model of a pixel-space preset (`--model pixel`) given no --vae records --vae none."""
    m = config.model
    pixel_preset = m.preset in TEXT_PRESETS and TEXT_PRESETS[m.preset].pixel_space
    if m.base or m.conditioning != "text" or m.vae or not pixel_preset:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(m, vae=PIXEL_SPACE))


def trains_vae_stage(config: TrainConfig) -> bool:
    """Whether the run trains its own VAE first: a new latent text model given no --vae."""
    m = config.model
    return not m.base and m.conditioning == "text" and not m.vae


def resolve_vae_budget(config: TrainConfig) -> TrainConfig:
    """The VAE stage's budget, written into the saved config: --vae-steps (default VAE_STEPS) and --vae-minutes;
    with --minutes and neither of those given, the stage takes VAE_SHARE of the minutes (the UNet trains for
    what the stage leaves: budget.Budget.from_config). Other runs keep the VAE settings unset."""
    v, minutes = config.vae, config.run.minutes
    if not trains_vae_stage(config):
        return config
    if minutes and v.minutes is not None and v.minutes >= minutes:
        raise ConfigError(f"--vae-minutes {v.minutes:g} leaves nothing of --minutes {minutes:g} for the UNet: "
                          "--minutes bounds the whole run, the VAE stage included; give a larger --minutes or a "
                          "smaller --vae-minutes")
    share = minutes is not None and v.steps is None and v.minutes is None
    vae = dataclasses.replace(v, steps=VAE_STEPS if v.steps is None else v.steps,
                              minutes=round(VAE_SHARE * minutes, 4) if share else v.minutes)
    return dataclasses.replace(config, vae=vae)


def resolve_timestep_shift(config: TrainConfig) -> TrainConfig:
    """--timestep-shift left to difflab: TEXT_TIMESTEP_SHIFT for a new latent text model (its small latent's
    layout is decided at high noise), 1 (the uniform draw) for every other run."""
    if config.optim.timestep_shift is not None:
        return config
    m = config.model
    new_latent_text = not m.base and m.conditioning == "text" and (m.vae or "").lower() != PIXEL_SPACE
    shift = TEXT_TIMESTEP_SHIFT if new_latent_text else 1.0
    return dataclasses.replace(config, optim=dataclasses.replace(config.optim, timestep_shift=shift))


def settings_and_data(config: TrainConfig, made_data: bool
                      ) -> tuple[TrainConfig, ImageDataset | None, DiffusionModel | None]:
    if config.model.base:
        if made_data:
            base = finetune.load_base(config)
            return finetune.settings_from_base(config, base), None, base
        return fine_tuning_settings(config)
    if made_data:
        raise ConfigError("training data made for the run needs a pretrained model to start from (--from)")
    if config.model.lora_rank:  # adapters on new random weights, with the weights themselves frozen, learn nothing
        raise ConfigError("--lora-rank trains adapters on a pretrained text-to-image model: give that model with "
                          "--from (a new model trains every weight)")
    d, text = config.data, config.model.conditioning == "text"
    if text and d.channels == 1:
        raise DataError("--conditioning text makes RGB models (the VAE takes 3 channels); leave out --channels 1")
    data = open_dataset(d.spec, d.image_size, 3 if text else d.channels, d.split, d.strict, d.memory_limit_mb,
                        caption_column=d.caption_column, caption_template=d.caption_template)
    if config.model.conditioning == "class" and not data.has_labels:
        raise DataError(f"--conditioning class needs labelled data, and {d.spec} has no labels "
                        "(put each class's images in its own sub-folder)")
    if text and not data.has_captions:
        raise DataError(f"--conditioning text needs captions, and {d.spec} has none: add a metadata.jsonl "
                        "(file_name, text) or IMAGE.txt files, or give labelled data a --caption-template such as "
                        "'a photo of a {label}'")
    return resolve_data_settings(config, data), data, None


def fine_tuning_settings(config: TrainConfig) -> tuple[TrainConfig, ImageDataset, DiffusionModel]:
    base = finetune.load_base(config)
    settled = finetune.settings_from_base(config, base)
    d = settled.data
    text = settled.model.conditioning == "text"
    data = open_dataset(d.spec, d.image_size, 3 if text else None,  # a pixel model's data: its own channels
                        d.split, d.strict, d.memory_limit_mb,
                        caption_column=d.caption_column, caption_template=d.caption_template)
    data = finetune.fit_data(data, settled)
    return resolve_data_settings(settled, data), data, finetune.fine_tuned(base, settled, data)


VALIDATION_PROMPTS = 8


def validation_prompts(run, data) -> list[str]:
    """The grids' prompts: --sample-prompts, or distinct captions spread over the data."""
    if run.sample_prompts:
        prompts = [p.strip() for p in run.sample_prompts.split("|") if p.strip()]
        if not prompts:
            raise ConfigError("--sample-prompts holds no prompt; separate prompts with |")
        for prompt in prompts:  # A1111's syntax (docs/prompts.md)
            parse_prompt(prompt)
        return prompts
    distinct = list(dict.fromkeys(c for c in data.captions if c))
    step = max(1, len(distinct) // VALIDATION_PROMPTS)
    return distinct[::step][:VALIDATION_PROMPTS]
