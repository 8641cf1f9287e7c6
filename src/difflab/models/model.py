"""A difflab model: the denoiser, the noise schedule it was trained with, what it was made from, and —
for latent and text models — the latent codec and the prompt encoder.

A pixel model is the same container with no codec and no prompt encoder. What the UNet's extra input
channels hold (its `variant`) is decided by loading the folder (see models/variants.py), never by a
flag the user must match.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from difflab.errors import ModelError
from difflab.models.codec import LatentCodec
from difflab.models.denoiser import Denoiser
from difflab.models.schedules import PREDICTIONS
from difflab.models.text import PromptEncoder
from difflab.models.variants import VARIANTS, Variant

# Classifier-free guidance for class-conditional models: on MNIST, 1.5 gave both the best Fréchet
# distance and 99% class accuracy (2 sharpens classes but narrows them; docs/benchmarks.md).
DEFAULT_CFG_SCALE = 1.5
# Text-to-image models: Stable Diffusion's customary scale (the course's, and diffusers' default).
DEFAULT_TEXT_CFG_SCALE = 7.5


@dataclass
class TrainingRecord:
    """How a model was trained: difflab.json's `training`, and what the model card says of it. Every field
    is optional (a model difflab did not train records nothing; older files lack newer fields) and only
    those that are set are written, so the JSON reads as before."""

    images: int | None = None  # training images (DreamBooth: instance and class images together)
    preset: str | None = None  # the network preset of a new model
    captions: int | None = None  # distinct captions of a text model's data
    caption_template: str | None = None  # captions made from class labels (--caption-template)
    cond_dropout: float | None = None  # chance a label or caption was dropped, for classifier-free guidance
    lora_rank: int | None = None
    timestep_shift: float | None = None  # timesteps shifted towards high noise (1: not shifted)
    # a new text model's parts: where its VAE and text encoder came from
    vae: str | None = None
    vae_psnr: float | None = None
    text_encoder: str | None = None
    text_encoder_trained: bool | None = None
    # DreamBooth's subject
    instance_prompt: str | None = None
    token: str | None = None  # the subject's (or a textual inversion's) token
    instance_images: int | None = None
    class_prompt: str | None = None
    class_images: int | None = None
    prior_loss_weight: float | None = None
    # textual inversion's
    init_word: str | None = None
    num_vectors: int | None = None
    what: str | None = None  # "object" or "style"
    templates: int | None = None
    # the run, filled in when the model is saved
    steps: int | None = None
    images_seen: int | None = None
    minutes: float | None = None
    device: str | None = None
    ema_decay: float | None = None
    lr: float | None = None
    # how --minutes were split (training/saving.py time_split)
    vae_minutes: float | None = None  # the VAE stage's (they count against --minutes)
    vae_steps: int | None = None
    evaluation_classifier_minutes: float | None = None  # trained on the way, not counted
    others: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they were

    def update(self, values: dict | None = None, **more) -> None:
        for name, value in {**(values or {}), **more}.items():
            if name in self.__dataclass_fields__ and name != "others":
                setattr(self, name, value)
            else:
                self.others[name] = value

    def to_json(self) -> dict:
        found = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "others"}
        return {**{k: v for k, v in found.items() if v is not None}, **self.others}

    @classmethod
    def from_json(cls, data) -> TrainingRecord:
        record = cls()
        record.update(data if isinstance(data, dict) else {})
        return record


@dataclass
class ModelInfo:
    """Saved as difflab.json next to the diffusers folders: read and written here (`from_json`, `to_json`)."""

    image_size: int
    channels: int
    data: str = ""
    class_names: list[str] | None = None  # set for class-conditional models
    class_method: str | None = None  # "embedding" or "channels" (see models/denoiser.py)
    class_embed_dim: int | None = None  # width of the "channels" class embedding
    base_model: str | None = None
    training: TrainingRecord = field(default_factory=TrainingRecord)
    evaluation: dict[str, str] = field(default_factory=dict)  # measured figures, in words, by what measured them
    # The classifier-free guidance it samples with unless told: cfg_scale, cfg_interval "LOW-HIGH" (sigma),
    # cfg_rescale (diffusion/cfg.py); empty: the kind's scale, plain.
    guidance: dict[str, Any] = field(default_factory=dict)
    format_version: int = 1

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**data, "training": self.training.to_json(), "class_names": copy.copy(self.class_names),
                "evaluation": dict(self.evaluation)}

    def dumps(self) -> str:
        """difflab.json's text."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: dict) -> ModelInfo:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["training"] = TrainingRecord.from_json(known.get("training"))
        return cls(**known)


@dataclass
class DiffusionModel:
    denoiser: Denoiser
    noise_schedule: Any  # diffusers DDPMScheduler: the forward process; samplers are built from its config
    info: ModelInfo
    codec: LatentCodec | None = None  # latent models: x_t lives in the VAE's latent space
    prompts: PromptEncoder | None = None  # text models: prompts reach the UNet by cross-attention
    variant: str | None = None  # what the UNet's extra input channels hold: None, inpaint, depth, upscale
    scheduler_config: dict | None = None  # a diffusers folder's own scheduler settings, samplers start from them
    low_res_scheduler: Any = None  # the upscaler's: noises its low-resolution input
    max_noise_level: int | None = None  # the upscaler's: the highest noise level it was trained with
    safety_checker: Any = None  # (StableDiffusionSafetyChecker, its CLIP image processor), run when present
    depth_estimator: Any = None  # (transformers depth model, its image processor), for depth-to-image
    execution_device: torch.device | None = None  # set by models/offload.py: where the networks run

    @property
    def kind(self) -> Variant:
        return VARIANTS[self.variant]

    @property
    def latent(self) -> bool:
        return self.codec is not None

    @property
    def sampler_config(self):
        """The config every sampler is built from: the folder's scheduler, or the noise schedule."""
        return self.scheduler_config if self.scheduler_config is not None else self.noise_schedule.config

    def sample_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The shape the sampler works on for images of height × width (latents for latent models)."""
        if self.codec is None:
            return self.info.channels, height, width
        return self.codec.channels, height // self.codec.factor, width // self.codec.factor

    @property
    def size_factor(self) -> int:
        """Image sides must be multiples of this: the VAE's factor, or for a pixel UNet, the factor its
        levels halve the image by."""
        if self.codec is not None:
            return self.codec.factor
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def default_cfg_scale(self) -> float:
        kind = DEFAULT_TEXT_CFG_SCALE if self.prompts is not None else DEFAULT_CFG_SCALE
        return float(self.default_guidance.get("cfg_scale", kind))

    @property
    def default_guidance(self) -> dict:
        """The guidance the folder records (difflab.json's `guidance`), {} for the kind's plain default."""
        return self.info.guidance or {}

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
        """Where the networks run (and sampling's tensors live): with model CPU offload, the GPU the
        networks visit in turn, though their weights rest on the CPU."""
        if self.execution_device is not None:
            return self.execution_device
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The type the UNet's weights are held in (float16/bfloat16 when loaded for half-precision sampling)."""
        return next(self.denoiser.unet.parameters()).dtype

    def freeze(self) -> DiffusionModel:
        """For sampling only: every network in eval mode and no parameter requiring a gradient (nothing
        records operations for a backward pass; guidance's gradients still reach the images)."""
        for part in self.modules():
            part.eval().requires_grad_(False)
        return self

    def to(self, device) -> DiffusionModel:
        for part in self.modules():
            part.to(device)
        return self

    def load_textual_inversion(self, spec, token: str | None = None, *, allow_pickle: bool = False) -> list[str]:
        """Add a textual inversion embedding (`FILE[:TOKEN]`; see models/embeddings.py) to the tokenizer and
        text encoder, as diffusers' `load_textual_inversion` does; returns its tokens."""
        from difflab.models.embeddings import load_embedding

        return load_embedding(self, spec, token, allow_pickle=allow_pickle)

    def modules(self) -> list[torch.nn.Module]:
        """Every network the model holds."""
        parts = [self.denoiser]
        if self.codec is not None:
            parts.append(self.codec.vae)
        if self.prompts is not None:
            parts.append(self.prompts.text_encoder)
        for extra in (self.safety_checker, self.depth_estimator):
            if extra is not None:
                parts.append(extra[0])
        return parts
