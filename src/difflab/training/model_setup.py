"""The model a denoiser run trains and the choice of what trains of it.

A new model is built (a text model with its VAE stage run first when it has no --vae), or the pretrained
one (--from) is taken, described as a model of the run's data; then LoRA adapters, a `TrainedPart`
(textual inversion's new rows) and the memory features. Every function returns what it makes: the
caller holds the model and its text parts (`RunModel`), nothing is set on the side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from difflab.config import TrainConfig
from difflab.data import ImageDataset
from difflab.errors import ConfigError
from difflab.models.build import build_model
from difflab.models.model import DiffusionModel
from difflab.training import finetune, memory_features
from difflab.training.run_folder import RunFolder
from difflab.training.settings import DataMaker
from difflab.training.text_model import TextModelParts, build_text_model

log = logging.getLogger("difflab")


class TrainedPart(Protocol):
    """What trains when it is neither the whole network nor LoRA on it (textual inversion's new token rows):
    made from the settled config and the pretrained model by a `PartMaker`, after which only its parameters
    require gradients. A checkpoint holds only its tensors (and their optimizer state), and the run's model
    is what it saves."""

    text_encoder_in_step: bool  # the step runs the text encoder forward (its output is not a ready input)

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def save(self, folder: Path, model: DiffusionModel) -> None: ...


PartMaker = Callable[[TrainConfig, DiffusionModel], TrainedPart]


@dataclass
class RunModel:
    """What a denoiser run trains: the model, its text parts (text-to-image runs: what the model was made
    of, and whether the text encoder trains), the part that trains when it is not a whole network, and the
    full-precision weights of frozen networks held in the half type (the saved model gets them back)."""

    model: DiffusionModel
    text: TextModelParts | None
    part: TrainedPart | None
    full_frozen: dict

    @property
    def text_in_step(self) -> bool:
        """Whether the step runs the text encoder forward: it trains, or a part of it does."""
        if self.text is None:
            return False
        return self.text.train_text_encoder or bool(self.part and self.part.text_encoder_in_step)


def set_up_model(config: TrainConfig, accelerator, run: RunFolder, made: ImageDataset | None,
                 base: DiffusionModel | None, maker: DataMaker | None, trained: PartMaker | None, given, clock, *,
                 yes: bool) -> tuple[RunModel, ImageDataset]:
    """The run's model (new, or the pretrained `base`) and its data (`made`, or what `maker` makes), with
    LoRA, the trained part and the memory features applied; the memory estimate is checked first."""
    if base is not None:  # a pretrained model: refused before class images are generated for it
        check_memory(config, accelerator, base, base.info.image_size, bool(config.model.train_text_encoder),
                     textual_inversion=trained is not None, yes=yes)
    if maker is not None:
        made, base = made_data(config, accelerator, run, maker, base)
    data = made
    if base is None:
        model, text = new_model(config, data, run.root, accelerator, clock, given)
        check_memory(config, accelerator, model, data.image_size, bool(text and text.train_text_encoder),
                     textual_inversion=False, yes=yes)
    else:
        model = base
        text = TextModelParts(base, bool(config.model.train_text_encoder), None) if base.prompts is not None else None
    if config.model.lora_rank:
        add_lora(config, model, text)
    part = trained(config, model) if trained is not None else None
    full_frozen = use_memory_features(config, accelerator, model, text, part)
    return RunModel(model, text, part, full_frozen), data


def check_memory(config: TrainConfig, accelerator, model: DiffusionModel, image_size: int, trains_text: bool, *,
                 textual_inversion: bool, yes: bool) -> None:
    """The run's estimated peak memory on its device (difflab.memory), from the model's parameter counts and
    the run's flags, before the optimizer and any step: refused (ConfigError naming the flags that would make
    it fit) when it exceeds the device's free memory, unless --yes (`yes`). Said in the log from
    SAY_MEMORY_FROM bytes (small runs stay quiet) or with --yes. Main process only."""
    from difflab.memory import SAY_MEMORY_FROM, ModelShape, check_training_memory, estimate_training

    if not accelerator.is_main_process:
        return
    flags = memory_flags(config, accelerator, model, image_size, trains_text, textual_inversion=textual_inversion)
    shape = ModelShape.of_model(model)
    said = check_training_memory(shape, accelerator.device, yes=yes,
                                 lora_flag="--lora" if hasattr(config, "dreambooth") else "--lora-rank 4", **flags)
    if yes or estimate_training(shape, **flags).total >= SAY_MEMORY_FROM:
        log.info(said)


def memory_flags(config: TrainConfig, accelerator, model: DiffusionModel, image_size: int, trains_text: bool, *,
                 textual_inversion: bool) -> dict:
    """What difflab.memory.estimate_training needs to know of this run, from its settings."""
    c = config
    return dict(
        height=image_size, width=image_size, batch=c.optim.batch_size,
        # textual inversion trains a few embedding rows: like LoRA, a sliver of the weights trains; its
        # frozen networks stay in fp32 (use_memory_features), so its weights are counted at full size
        lora=bool(c.model.lora_rank) or textual_inversion, checkpointing=c.optim.gradient_checkpointing,
        optimizer=c.optim.optimizer, precision="no" if textual_inversion else accelerator.mixed_precision,
        train_text_encoder=trains_text and model.prompts is not None and not textual_inversion,
        # DreamBooth's prior preservation mixes class images into the data (a batch of 2 holds one of each on
        # average, training/dreambooth.py make_data) rather than doubling the batch as diffusers' script does
        prior_preservation=False)


def made_data(config: TrainConfig, accelerator, run: RunFolder, maker: DataMaker, base: DiffusionModel
              ) -> tuple[ImageDataset, DiffusionModel]:
    """The data a DataMaker makes for the run (the main process first: it may write files the others
    then read), fitted to the pretrained model; and that model, described as a model of this data."""
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
    data = finetune.fit_data(maker(config, base, run), config)
    if accelerator.is_main_process:
        accelerator.wait_for_everyone()
    return data, finetune.fine_tuned(base, config, data)


def new_model(config: TrainConfig, data: ImageDataset, run_root: Path, accelerator, clock, given=None
              ) -> tuple[DiffusionModel, TextModelParts | None]:
    """A new model of the preset's size for the data: (model, its text parts for a text model)."""
    c = config
    if c.model.conditioning == "text":
        text = build_text_model(c, data, run_root, accelerator, clock, given)
        return text.model, text
    names = data.class_names if c.model.conditioning == "class" else None
    return build_model(c.model, data.image_size, data.channels, data.source, c.run.seed, names), None


def add_lora(config: TrainConfig, model: DiffusionModel, text: TextModelParts | None) -> None:
    """LoRA as the choice of trainable parameters: adapters on the attention projections (of the text
    encoder too when it trains), every other weight frozen (models/lora.py)."""
    from difflab.models.lora import add_lora

    if text is None:
        raise ConfigError("--lora-rank adapts text-to-image models; this model has no text encoder")
    with torch.random.fork_rng(devices=[]):  # the adapters' first weights from the run's seed: same seed, same run
        torch.manual_seed(config.run.seed)
        add_lora(model, config.model.lora_rank, text_encoder=text.train_text_encoder)


def use_memory_features(config: TrainConfig, accelerator, model: DiffusionModel, text: TextModelParts | None,
                        part: TrainedPart | None) -> dict:
    """--gradient-checkpointing, and the frozen networks in the half type of fp16/bf16 mixed precision;
    returns the full-precision weights of frozen networks that the saved model holds (memory_features)."""
    trains_text = bool(text and text.train_text_encoder)
    if config.optim.gradient_checkpointing:
        memory_features.enable_gradient_checkpointing(model, text_encoder=trains_text)
    lora = bool(config.model.lora_rank)
    if part is not None:  # textual inversion: its text encoder runs in the step; left as it is
        return {}
    return memory_features.hold_frozen_in_half(model, accelerator.mixed_precision, keep_full=not lora,
                                               device=accelerator.device)
