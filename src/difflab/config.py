"""Training configuration.

The dataclasses below are the single source of truth: each field declares its default, its
command-line flag and its help text. A run's config is built from the defaults, then a TOML file
(`--config`), then flags; the fully resolved config is saved as `config.toml` in the run folder and
can be run again as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from difflab.checks import (
    MOST,
    SIGNED,
    check_at_least,
    check_finite,
    check_image_size,
    check_timesteps,
)
from difflab.data import DATA_SPEC_HELP
from difflab.data.folder import DEFAULT_MEMORY_LIMIT_MB
from difflab.devices import pick_device
from difflab.diffusion.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, check_sampler_steps
from difflab.errors import ConfigError
from difflab.models.denoiser import CLASS_METHODS
from difflab.models.model import DEFAULT_CFG_SCALE, DEFAULT_TEXT_CFG_SCALE
from difflab.models.schedules import PREDICTIONS, SCHEDULES
from difflab.models.scratch_model import SCRATCH_SAMPLE_STEPS


@dataclass(frozen=True)
class Check:
    """A rule a setting's value must follow, with the words that say so in an error."""

    holds: Callable[[Any], bool]
    must: str


POSITIVE = Check(lambda v: v > 0, "must be greater than 0")
NOT_NEGATIVE = Check(lambda v: v >= 0, "must be 0 or more")
FRACTION = Check(lambda v: 0 <= v < 1, "must be in [0, 1)")


def option(default, help: str, *, flag: str | None = None, choices=None, check: Check | None = None,
           resumable: bool = False, set_by_base: bool = False, default_text: str | None = None):
    """A config field with everything said about it in one place: its default, command-line flag
    (default: --field-name) and help text; the values it may take (`choices`, or a `check` on any value
    given); whether a resumed run may change it (`resumable`: it changes no weights, or it lets a
    diverged run go on from its last good checkpoint); and whether a pretrained model decides it when
    fine-tuning (`set_by_base`); `default_text`: what --help says of a default of None (say, "1000 when no
    budget is given"), unless a command has a default of its own."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "check": check,
                                            "resumable": resumable, "set_by_base": set_by_base,
                                            "default_text": default_text})


# Settings both run kinds (difflab train and difflab scratch train) have, declared once.
def steps_option(what: str = "steps"):
    return option(None, f"stop after this many {what}", check=POSITIVE, resumable=True,
                  default_text="1000 when no budget is given")


def epochs_option():
    return option(None, "stop after this many passes over the data", check=POSITIVE, resumable=True)


def minutes_option():
    return option(None, "stop after this many minutes of training", check=POSITIVE, resumable=True)


def seed_option():
    return option(0, "seed for weights, data order and noise")


def sample_every_option():
    return option(500, "write a sample grid every N steps (0 = only at the end)", resumable=True)


def sample_count_option():
    return option(16, "images in each sample grid", check=POSITIVE, resumable=True)


def log_every_option():
    return option(10, "append a row to metrics.csv every N steps", check=POSITIVE, resumable=True)


def device_option():
    return option("auto", "auto, cpu, cuda, cuda:N or mps", resumable=True)


@dataclass
class DataConfig:
    spec: str = option("digits", f"training images: {DATA_SPEC_HELP}", flag="--data")
    image_size: int | None = option(None, "side of the square training images in pixels (default: the data's own, "
                                          "at most 64; 16 for digits)", check=POSITIVE, set_by_base=True)
    channels: int | None = option(None, "1 (grey) or 3 (RGB); default: the data's own", choices=(1, 3),
                                  set_by_base=True)
    split: str = option("train", "which part of the data to use", choices=("train", "test", "all"))
    flip: bool = option(False, "random horizontal flips")
    strict: bool = option(False, "stop at the first unreadable image instead of skipping it with a warning")
    caption_column: str | None = option(None, "the metadata or dataset column that holds the captions (default: text "
                                              "or caption)")
    caption_template: str | None = option(None, 'captions for labelled data, such as "a photo of a {label}"')
    cache_latents: bool = option(True, "latent models: encode each image once before training instead of at every "
                                       "step (both orientations with --flip)")
    memory_limit_mb: int = option(DEFAULT_MEMORY_LIMIT_MB,
                                  "keep a folder's decoded images in memory up to this many MB; a larger folder is "
                                  "read from disk by worker processes as training goes (0: always)",
                                  check=NOT_NEGATIVE, resumable=True)


@dataclass
class ModelConfig:
    base: str | None = option(None, "fine-tune this pretrained model instead of starting from new weights: a difflab "
                                    "model or run folder, a diffusers DDPMPipeline/DDIMPipeline or "
                                    "StableDiffusionPipeline folder, or a Hub id; its network, noise schedule, "
                                    "conditioning and image size are used, and the settings of this section that "
                                    "describe them are taken from it",
                              flag="--from")
    allow_pickle: bool = option(False, "let --from load weights stored as a pickle (.bin), with "
                                       "torch.load(weights_only=True)", resumable=True)
    preset: str = option("small", "UNet preset (tiny, small, medium, course; for text models tiny, small, quick, "
                                  "pixel, medium) or a diffusers UNet config.json",
                         flag="--model", set_by_base=True)
    schedule: str = option("cosine", "noise schedule", choices=tuple(SCHEDULES), set_by_base=True)
    prediction: str = option("v", "what the network predicts (v is robust at every noise level)",
                             choices=tuple(PREDICTIONS), set_by_base=True)
    timesteps: int = option(1000, "number of training timesteps", check=POSITIVE, set_by_base=True)
    conditioning: str = option("none", "condition the model on class labels (needs labelled data) or on captions "
                                       "(a latent text-to-image model: VAE, text encoder, cross-attention UNet)",
                               choices=("none", "class", "text"), set_by_base=True)
    vae: str | None = option(None, "text models: an AutoencoderKL to use (a folder, a Stable Diffusion folder or a Hub "
                                   "id), frozen; default: train one first, in the run folder; none: pixel space")
    text_encoder: str | None = option(None, "text models: a CLIP text encoder and its tokenizer to use (a folder, a "
                                            "Stable Diffusion folder or a Hub id); default: a new one, trained with "
                                            "the UNet on a tokenizer learnt from the captions")
    train_text_encoder: bool | None = option(None, "train the text encoder with the UNet (default: yes for a new "
                                                   "one, no for one given with --text-encoder)")
    class_method: str = option("embedding", "how labels enter the UNet: added to the timestep embedding, or as "
                                            "extra input channels (the course's way)",
                               choices=CLASS_METHODS, set_by_base=True)
    class_embed_dim: int = option(4, "width of the class embedding for --class-method channels", set_by_base=True)
    lora_rank: int | None = option(None, "fine-tuning a text model (--from): train LoRA adapters of this rank (at most "
                                         "the width of the layers they adapt) on the attention projections (of the "
                                         "UNet, and of the text encoder when it trains) instead of every weight; the "
                                         "run saves pytorch_lora_weights.safetensors (diffusers' LoRA format)",
                                   check=POSITIVE)
    cond_dropout: float = option(0.1, "chance of dropping a label to the null class (a caption to the empty one) in "
                                      "training, which classifier-free guidance needs (0 = never)", check=FRACTION)


TEXT_TIMESTEP_SHIFT = 2.0  # --timestep-shift of a new latent text-to-image model
VAE_STEPS = 2000  # a VAE stage's steps unless --vae-steps says otherwise
# A text run's --minutes bound the whole run; the VAE stage takes this share of them unless --vae-steps or
# --vae-minutes is given (why this share: docs/text-to-image.md, "How --minutes is split").
VAE_SHARE = 0.15


@dataclass
class OptimConfig:
    lr: float = option(1e-3, "peak learning rate (AdamW)", check=POSITIVE, resumable=True)
    lr_schedule: str = option("cosine", "learning-rate decay after warmup", choices=("cosine", "constant"))
    warmup_steps: int = option(100, "linear learning-rate warmup, in optimizer steps", resumable=True)
    weight_decay: float = option(0.0, "AdamW weight decay")
    batch_size: int = option(64, "images per device per micro-batch", check=POSITIVE)
    grad_accum: int = option(1, "micro-batches per optimizer step (the loss is averaged over them)", check=POSITIVE)
    clip_grad: float = option(1.0, "clip the gradient norm to this (0 = off)", resumable=True)
    ema_decay: float = option(0.999, "decay of the weights' moving average used for samples and the saved model "
                                     "(0 = off)", check=FRACTION)
    min_snr_gamma: float = option(0.0, "min-SNR-γ loss weighting (5 is typical; 0 = off)")
    timestep_shift: float | None = option(None, "draw training timesteps shifted towards high noise by this factor "
                                                "(Stable Diffusion 3's shift; 1 = uniform). Default: "
                                                f"{TEXT_TIMESTEP_SHIFT:g} for a new latent text model, whose layout "
                                                "is decided at high noise (on shapes it lifted position from 65 to "
                                                "100 per cent: docs/text-to-image.md), else 1", check=POSITIVE)
    precision: str = option("auto", "mixed precision (auto: bf16 on GPUs and CPUs that run it fast, fp16 with loss "
                                    "scaling on GPUs older than compute capability 8.0, else none); the frozen parts "
                                    "(VAE, a text encoder that does not train) are held in the half type",
                            choices=("auto", "no", "fp16", "bf16"))
    optimizer: str = option("adamw", "adamw; adamw8bit (bitsandbytes' 8-bit AdamW: a quarter of AdamW's state memory; "
                                     "pip install 'difflab[gpu]'); adafactor (transformers', factored second moments)",
                            choices=("adamw", "adamw8bit", "adafactor"))
    gradient_checkpointing: bool = option(False, "recompute the UNet's (and a trained text encoder's) activations in "
                                                 "the backward pass instead of keeping them: less memory, about a "
                                                 "third more time per step", resumable=True)


@dataclass
class VaeConfig:
    """The VAE stage of a text-to-image run that is given no --vae."""

    steps: int | None = option(None, "optimizer steps of the VAE stage", flag="--vae-steps", check=POSITIVE,
                               resumable=True, default_text=f"{VAE_STEPS}")
    minutes: float | None = option(None, "stop the VAE stage after this many minutes", flag="--vae-minutes",
                                   check=POSITIVE, resumable=True,
                                   default_text=f"with --minutes, {round(VAE_SHARE * 100)} per cent of them (the rest "
                                                "trains the UNet)")
    lr: float = option(2e-3, "peak learning rate of the VAE stage", flag="--vae-lr", check=POSITIVE)
    batch_size: int = option(16, "images per VAE step (small batches, more steps: the VAE learns faster per "
                                 "CPU-minute)", flag="--vae-batch-size", check=POSITIVE)
    kl_weight: float = option(1e-6, "weight of the KL term (small: a nearly deterministic autoencoder, as in latent "
                                    "diffusion)", flag="--vae-kl-weight", check=NOT_NEGATIVE)
    detail_weight: float = option(2.0, "extra weight in the reconstruction loss on pixels far from their image's mean "
                                       "colour, so that a small object's colour and shape count beside a large "
                                       "background (0 = plain mean squared error; 2 lifted colour read back on shapes "
                                       "from 64 to 100 per cent: docs/text-to-image.md)", flag="--vae-detail-weight",
                                  check=NOT_NEGATIVE)


@dataclass
class RunConfig:
    steps: int | None = steps_option("optimizer steps")
    epochs: float | None = epochs_option()
    minutes: float | None = minutes_option()
    seed: int = seed_option()
    sample_every: int = sample_every_option()
    sample_count: int = sample_count_option()
    sample_sampler: str = option(DEFAULT_SAMPLER, "sampler for the grids", choices=tuple(SAMPLERS), resumable=True)
    sample_steps: int = option(DEFAULT_STEPS, "sampler steps for the grids", check=POSITIVE, resumable=True)
    sample_cfg_scale: float | None = option(None, "classifier-free guidance scale for grids and evaluations of "
                                                  f"conditional models (default {DEFAULT_CFG_SCALE} for class models, "
                                                  f"{DEFAULT_TEXT_CFG_SCALE} for text models)", check=NOT_NEGATIVE,
                                            resumable=True)
    sample_prompts: str | None = option(None, "text models: validation prompts for the grids, separated by | (default: "
                                              "captions drawn from the data)", resumable=True)
    eval_every: int = option(0, "evaluate (Fréchet distance, class accuracy) every N steps and at the end (0 = never)",
                             resumable=True)
    eval_count: int = option(500, "images generated for each evaluation", resumable=True)
    log_with: str | None = option(None, "also log metrics and evaluations to TensorBoard (in the run folder) or "
                                        "Weights & Biases, through accelerate; the package must be installed",
                                  choices=("tensorboard", "wandb"), resumable=True)
    checkpoint_every: int = option(500, "save a full checkpoint every N steps (0 = only at the end)", resumable=True)
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep", check=POSITIVE, resumable=True)
    log_every: int = log_every_option()
    device: str = device_option()


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> TrainConfig:
        check_config_values(self)  # inf/nan, sizes and steps out of range, a device not here
        check_values(self)
        check_config_ranges(self)  # what the declared checks leave: negative numbers, counts past memory
        return self


# ---- DreamBooth (difflab dreambooth) ----------------------------------------------------------------

@dataclass
class DreamBoothSection:
    """What DreamBooth adds to a fine-tuning run: the subject's images and prompt, and prior preservation."""

    instance_data: str | None = option(None, "folder of the subject's images (3 to 5 is typical; at most a few "
                                             "hundred)")
    instance_prompt: str | None = option(None, 'the prompt that names the subject by a rare token and its class, such '
                                               'as "a photo of sks dog"')
    class_prompt: str | None = option(None, 'the prompt of the subject\'s class without the token, such as "a photo of '
                                            'dog" (for prior preservation)')
    class_data: str | None = option(None, "folder of class images for prior preservation (default: generated once by "
                                          "the base model from --class-prompt and kept in the run folder)")
    prior_preservation: bool = option(False, "also train on class images with their class prompt, so the model "
                                             "keeps what the class looks like (against language drift)")
    num_class_images: int = option(100, "class images for prior preservation (generated when --class-data has "
                                        "fewer)", check=POSITIVE)
    prior_loss_weight: float = option(1.0, "weight of the class images' loss", check=NOT_NEGATIVE)


@dataclass
class DreamBoothConfig(TrainConfig):
    dreambooth: DreamBoothSection = field(default_factory=DreamBoothSection)


# DreamBooth's learning rate as a fraction of the base model's own (pre-training) one: diffusers'
# train_dreambooth.py uses 5e-6 on Stable Diffusion (trained at 1e-4) for full fine-tuning, and
# train_dreambooth_lora.py 1e-4 for LoRA.
DREAMBOOTH_LR_FRACTION = {"full": 5e-6 / 1e-4, "lora": 1.0}
STABLE_DIFFUSION_LR = 1e-4  # assumed for a base model that does not record its own


def dreambooth_defaults() -> DreamBoothConfig:
    """Fine-tuning defaults for a handful of images, after diffusers' DreamBooth scripts: 400 steps of 2
    images (one subject and one class image, on average, with prior preservation) at a constant
    learning rate without warmup, no moving average, no caption dropout. The learning rate is set
    from the base model's (see `DREAMBOOTH_LR_FRACTION`)."""
    config = DreamBoothConfig()
    o, run = config.optim, config.run
    o.lr, o.lr_schedule, o.warmup_steps, o.batch_size, o.ema_decay = STABLE_DIFFUSION_LR * 0.05, "constant", 0, 2, 0.0
    config.model.cond_dropout = 0.0
    run.steps, run.sample_every, run.checkpoint_every, run.sample_count = 400, 100, 200, 4
    return config


# ---- textual inversion (difflab textual-inversion) ------------------------------------------------------

@dataclass
class TextualInversionSection:
    """What textual inversion adds to a fine-tuning run: the new token, where its rows start, the captions."""

    token: str | None = option(None, 'the new token, such as "<my-thing>": a string the tokenizer does not hold')
    init_word: str | None = option(None, "a word the tokenizer holds as one token (what the subject is: dog, shape, "
                                         "painting): the new rows start from its embedding")
    num_vectors: int = option(1, "embedding rows the token learns (more hold more detail, and take more of the "
                                 "prompt's length)", check=POSITIVE)
    what: str = option("object", "the caption templates: object ('a photo of a {token}', ...) or style ('a painting "
                                 "in the style of {token}', ...)", choices=("object", "style"))


@dataclass
class TextualInversionConfig(TrainConfig):
    textual_inversion: TextualInversionSection = field(default_factory=TextualInversionSection)


def textual_inversion_defaults() -> TextualInversionConfig:
    """After diffusers' textual_inversion.py as its README runs it (batch 1 x 4 accumulated, 5e-4 scaled by the
    batch to 2e-3, constant, no warmup, 3,000 steps, AdamW weight decay 1e-2, random flips, no gradient
    clipping): here 4 images a step at 2e-3. No moving average, no caption dropout."""
    config = TextualInversionConfig()
    o, run = config.optim, config.run
    o.lr, o.lr_schedule, o.warmup_steps, o.batch_size, o.ema_decay = 2e-3, "constant", 0, 4, 0.0
    o.weight_decay, o.clip_grad = 1e-2, 0.0
    config.model.cond_dropout = 0.0
    config.data.flip = True
    run.steps, run.sample_every, run.checkpoint_every, run.sample_count = 3000, 500, 500, 4
    return config


# ---- the from-scratch teaching model (difflab scratch train) -----------------------------------------

@dataclass
class ScratchOptimConfig:
    lr: float = option(1e-3, "learning rate (Adam, constant, as in the course)", check=POSITIVE)
    batch_size: int = option(128, "images per step", check=POSITIVE)


@dataclass
class ScratchRunConfig:
    steps: int | None = steps_option()
    epochs: float | None = epochs_option()
    minutes: float | None = minutes_option()
    seed: int = seed_option()
    sample_every: int = sample_every_option()
    sample_count: int = sample_count_option()
    sample_steps: int = option(SCRATCH_SAMPLE_STEPS, "steps of the naive sampler for the grids", check=POSITIVE)
    log_every: int = log_every_option()
    device: str = device_option()


@dataclass
class ScratchConfig:
    data: DataConfig = field(default_factory=DataConfig)
    optim: ScratchOptimConfig = field(default_factory=ScratchOptimConfig)
    run: ScratchRunConfig = field(default_factory=ScratchRunConfig)

    def validate(self) -> ScratchConfig:
        check_config_values(self)  # inf/nan, sizes out of range, a device not here
        check_values(self)
        check_config_ranges(self)  # what the declared checks leave: negative numbers, counts past memory
        return self


# ---- fine-tuning (difflab finetune) ------------------------------------------------------------------

def finetune_defaults() -> TrainConfig:
    """`difflab train`'s defaults with a low learning rate and a short warmup: a pretrained model needs
    adjusting, not relearning."""
    config = TrainConfig()
    config.optim.lr = 1e-4
    config.optim.warmup_steps = 20
    return config


def check_values(config) -> None:
    """Every setting holds one of its choices, and every value given passes its setting's check."""
    for section in sections(config):
        for f in dataclasses.fields(section):
            choices, check, value = f.metadata["choices"], f.metadata["check"], getattr(section, f.name)
            if value is None:
                continue
            if choices is not None and value not in choices:
                raise ConfigError(
                    f"{flag_of(f)} {value!r} is not an option; choose one of: {', '.join(map(str, choices))}"
                )
            if check is not None and not check.holds(value):
                raise ConfigError(f"{flag_of(f)} {check.must} (got {value})")


def settings_marked(cls, mark: str) -> dict[str, set[str]]:
    """{section: names} of the settings of config class `cls` declared with `mark` (say, "set_by_base")."""
    return {section.name: {f.name for f in dataclasses.fields(section_cls) if f.metadata[mark]}
            for section, section_cls in zip(dataclasses.fields(cls), _field_types(cls).values())}


def sections(config) -> list:
    return [getattr(config, f.name) for f in dataclasses.fields(config)]


def check_config_values(config) -> None:
    """Every float setting of a training config (any kind) is finite, the image size in range, the
    device exists here and, where the config sets the noise schedule, its timesteps are enough for
    the grids' sampler steps."""
    check_finite({flag: value for flag, (_, value) in _numbers(config).items()})
    check_image_size(config.data.image_size)
    pick_device(config.run.device)  # --device cuda without a GPU must not train on the CPU without a word
    model = getattr(config, "model", None)
    if model is not None and not model.base:  # with --from, the base model decides (finetune.settings_from_base)
        check_timesteps(model.timesteps)
        check_sampler_steps(config.run.sample_steps, model.timesteps, config.run.sample_sampler, "--sample-steps")


def check_config_ranges(config) -> None:
    """After a config's own checks (which say more where they apply): no number setting is negative
    (a warmup of -5 steps), and counts stay below limits past which memory runs out."""
    numbers = _numbers(config)
    check_at_least({flag: value for flag, (name, value) in numbers.items() if name not in SIGNED}, 0)
    for flag, (name, value) in numbers.items():
        if name in MOST and value > MOST[name]:
            raise ConfigError(f"{flag} {value} is more than the {MOST[name]:,} difflab allows")


def _numbers(config) -> dict[str, tuple[str, int | float]]:
    """{flag: (field name, value)} for every int and float setting given (not None) in every section."""
    out = {}
    for section in (getattr(config, f.name) for f in dataclasses.fields(config)):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[flag_of(f)] = (f.name, value)
    return out


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(hint) -> type:
    """`int | None` -> int."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _field_types(cls) -> dict[str, type]:
    return {name: _base_type(hint) for name, hint in typing.get_type_hints(cls).items()}


# ---- TOML ------------------------------------------------------------------------------------------

def to_dict(config) -> dict[str, dict[str, Any]]:
    """Nested dict for TOML, without unset (None) values."""
    return {
        f.name: {k: v for k, v in dataclasses.asdict(getattr(config, f.name)).items() if v is not None}
        for f in dataclasses.fields(config)
    }


def from_dict(cls, data: dict, source: str):
    """Build a config from a nested dict, rejecting unknown sections and keys and wrong types."""
    kwargs = {}
    section_types = _field_types(cls)
    for name, values in data.items():
        if name not in section_types:
            raise ConfigError(f"{source}: unknown section [{name}]; known: {', '.join(section_types)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {name!r} must be a [section]")
        section_cls = section_types[name]
        types_ = _field_types(section_cls)
        unknown = [key for key in values if key not in types_]
        if unknown:
            raise ConfigError(f"{source}: unknown setting {unknown[0]!r} in [{name}]; known: {', '.join(types_)}")
        kwargs[name] = section_cls(
            **{key: _coerce(value, types_[key], f"{source}: [{name}] {key}") for key, value in values.items()}
        )
    return cls(**kwargs)


def _coerce(value, typ: type, where: str):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {typ.__name__}, not {value!r}")
    return value


def load_config(path: str | Path, cls=TrainConfig):
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:  # a folder, a file without read permission
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or e}); give a TOML file") from None
    return from_dict(cls, data, str(path))


def dumps_config(config) -> str:
    import tomli_w

    return tomli_w.dumps(to_dict(config))


def differences(a, b) -> list[str]:
    """Settings that differ between two configs, except those a resumed run may change."""
    out = []
    da, db = to_dict(a), to_dict(b)
    resumable = settings_marked(type(a), "resumable")
    for section in da:
        for key in sorted(set(da[section]) | set(db[section])):
            if key in resumable[section]:
                continue
            va, vb = da[section].get(key), db[section].get(key)
            if va != vb:
                out.append(f"[{section}] {key} = {va!r} (saved) vs {vb!r} (now)")
    return out


# ---- command-line flags ----------------------------------------------------------------------------

def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig, defaults=None,
                     skip: dict[str, set[str]] | None = None, helps: dict[str, str] | None = None) -> None:
    """One flag per config field, grouped by section. Flags left out keep the file's/default value.
    `defaults`: a config whose values --help shows (a command with defaults of its own); `skip`:
    {section: fields} that get no flag; `helps`: {"section.field": text} for a command whose own flags
    or defaults a setting's help must speak of (a text that says "default" gets no default appended)."""
    defaults = defaults if defaults is not None else cls()
    for section in dataclasses.fields(cls):
        section_cls = _field_types(cls)[section.name]
        group = parser.add_argument_group(f"[{section.name}] settings")
        types_ = _field_types(section_cls)
        for f in dataclasses.fields(section_cls):
            if f.name in (skip or {}).get(section.name, ()):
                continue
            typ = types_[f.name]
            dest = f"{section.name}.{f.name}"
            help_ = (helps or {}).get(dest, f.metadata["help"])
            if f.metadata["choices"]:
                help_ += f" ({', '.join(map(str, f.metadata['choices']))})"
            default = getattr(getattr(defaults, section.name), f.name)
            if "default" in (helps or {}).get(dest, ""):
                pass  # the command's own text says it
            elif default is not None and default is not False:
                help_ += f"; default {default}"
            elif default is None and f.metadata["default_text"]:
                help_ += f"; default {f.metadata['default_text']}"
            if typ is bool:
                group.add_argument(flag_of(f), dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_)
            else:
                group.add_argument(flag_of(f), dest=dest, type=typ, default=argparse.SUPPRESS,
                                   metavar=typ.__name__.upper(), help=help_)


def apply_flags(config, args: argparse.Namespace):
    """A copy of `config` with every flag the user gave applied."""
    given = {k: v for k, v in vars(args).items() if "." in k}
    updates: dict[str, dict[str, Any]] = {}
    for dest, value in given.items():
        section, name = dest.split(".", 1)
        updates.setdefault(section, {})[name] = value
    return dataclasses.replace(
        config, **{s: dataclasses.replace(getattr(config, s), **kv) for s, kv in updates.items()}
    )


def given_flags(args: argparse.Namespace) -> set[str]:
    return {k for k in vars(args) if "." in k}
