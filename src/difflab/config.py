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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from difflab.checks import check_config_ranges, check_config_values
from difflab.diffusion.samplers import DEFAULT_CFG_SCALE, SAMPLERS
from difflab.diffusion.schedules import PREDICTIONS, SCHEDULES
from difflab.errors import ConfigError

DATA_SPEC_HELP = (
    "a folder of images (labels from sub-folder names), digits, mnist:PATH, fashion-mnist:PATH, "
    "imagefolder:PATH, or a Hugging Face dataset id (owner/name)"
)


DEFAULT_MEMORY_LIMIT_MB = 2048


def option(default, help: str, *, flag: str | None = None, choices=None):
    """A config field with its command-line flag (default: --field-name) and help text."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass
class DataConfig:
    spec: str = option("digits", f"training images: {DATA_SPEC_HELP}", flag="--data")
    image_size: int | None = option(None, "side of the square training images in pixels (default: the data's own, "
                                          "at most 64; 16 for digits)")
    channels: int | None = option(None, "1 (grey) or 3 (RGB); default: the data's own", choices=(1, 3))
    split: str = option("train", "which part of the data to use", choices=("train", "test", "all"))
    flip: bool = option(False, "random horizontal flips")
    strict: bool = option(False, "stop at the first unreadable image instead of skipping it with a warning")
    memory_limit_mb: int = option(DEFAULT_MEMORY_LIMIT_MB,
                                  "keep a folder's decoded images in memory up to this many MB; a larger folder is "
                                  "read from disk by worker processes as training goes (0: always)")


@dataclass
class ModelConfig:
    base: str | None = option(None, "fine-tune this pretrained model instead of starting from new weights: a difflab "
                                    "model or run folder, a diffusers DDPMPipeline/DDIMPipeline folder, or a Hub id; "
                                    "its network, noise schedule, conditioning and image size are used, and the "
                                    "settings of this section that describe them are taken from it",
                              flag="--from")
    allow_pickle: bool = option(False, "let --from load weights stored as a pickle (.bin), with "
                                       "torch.load(weights_only=True)")
    preset: str = option("small", "UNet preset (tiny, small, medium, course) or a diffusers UNet config.json",
                         flag="--model")
    schedule: str = option("cosine", "noise schedule", choices=tuple(SCHEDULES))
    prediction: str = option("v", "what the network predicts (v is robust at every noise level)",
                             choices=tuple(PREDICTIONS))
    timesteps: int = option(1000, "number of training timesteps")
    conditioning: str = option("none", "condition the model on class labels (needs labelled data)",
                               choices=("none", "class"))
    class_method: str = option("embedding", "how labels enter the UNet: added to the timestep embedding, or as "
                                            "extra input channels (the course's way)",
                               choices=("embedding", "channels"))
    class_embed_dim: int = option(4, "width of the class embedding for --class-method channels")
    cond_dropout: float = option(0.1, "chance of dropping a label to the null class in training, which "
                                      "classifier-free guidance needs (0 = never)")


@dataclass
class OptimConfig:
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    lr_schedule: str = option("cosine", "learning-rate decay after warmup", choices=("cosine", "constant"))
    warmup_steps: int = option(100, "linear learning-rate warmup, in optimizer steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    batch_size: int = option(64, "images per device per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step (the loss is averaged over them)")
    clip_grad: float = option(1.0, "clip the gradient norm to this (0 = off)")
    ema_decay: float = option(0.999, "decay of the weights' moving average used for samples and the saved model "
                                     "(0 = off)")
    min_snr_gamma: float = option(0.0, "min-SNR-γ loss weighting (5 is typical; 0 = off)")
    precision: str = option("auto", "mixed precision (auto: bf16 on GPUs and CPUs that run it fast, fp16 on older "
                                    "GPUs, else none)", choices=("auto", "no", "fp16", "bf16"))


@dataclass
class RunConfig:
    steps: int | None = option(None, "stop after this many optimizer steps (default 1000 when no budget is given)")
    epochs: float | None = option(None, "stop after this many passes over the data")
    minutes: float | None = option(None, "stop after this many minutes of training")
    seed: int = option(0, "seed for weights, data order and noise")
    sample_every: int = option(500, "write a sample grid every N steps (0 = only at the end)")
    sample_count: int = option(16, "images in each sample grid")
    sample_sampler: str = option("dpm++2m", "sampler for the grids", choices=tuple(SAMPLERS))
    sample_steps: int = option(20, "sampler steps for the grids")
    sample_cfg_scale: float = option(DEFAULT_CFG_SCALE, "classifier-free guidance scale for grids and evaluations "
                                                        "of class-conditional models")
    eval_every: int = option(0, "evaluate (Fréchet distance, class accuracy) every N steps and at the end (0 = never)")
    eval_count: int = option(500, "images generated for each evaluation")
    log_with: str | None = option(None, "also log metrics and evaluations to TensorBoard (in the run folder) or "
                                        "Weights & Biases, through accelerate; the package must be installed",
                                  choices=("tensorboard", "wandb"))
    checkpoint_every: int = option(500, "save a full checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    log_every: int = option(10, "append a row to metrics.csv every N steps")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> TrainConfig:
        check_choices(self)
        check_config_values(self)  # inf/nan, sizes and steps out of range, a device not here
        positive = {
            "--lr": self.optim.lr, "--batch-size": self.optim.batch_size, "--grad-accum": self.optim.grad_accum,
            "--timesteps": self.model.timesteps, "--sample-steps": self.run.sample_steps,
            "--keep-checkpoints": self.run.keep_checkpoints, "--log-every": self.run.log_every,
        }
        for budget in ("steps", "epochs", "minutes", "image_size"):
            section = self.data if budget == "image_size" else self.run
            if getattr(section, budget) is not None:
                positive[f"--{budget.replace('_', '-')}"] = getattr(section, budget)
        check_positive(positive)
        if self.data.memory_limit_mb < 0:
            raise ConfigError(f"--memory-limit-mb must be 0 or more (got {self.data.memory_limit_mb})")
        if not 0 <= self.optim.ema_decay < 1:
            raise ConfigError(f"--ema-decay must be in [0, 1) (got {self.optim.ema_decay})")
        if not 0 <= self.model.cond_dropout < 1:
            raise ConfigError(f"--cond-dropout must be in [0, 1) (got {self.model.cond_dropout})")
        if self.run.sample_cfg_scale < 0:
            raise ConfigError(f"--sample-cfg-scale must be 0 or more (got {self.run.sample_cfg_scale})")
        check_config_ranges(self)  # what the checks above leave: negative numbers, counts past memory
        return self


# ---- the from-scratch teaching model (difflab scratch train) -----------------------------------------

SCRATCH_SAMPLE_STEPS = 40  # the course's final grid uses 40 steps of the naive sampler


@dataclass
class ScratchOptimConfig:
    lr: float = option(1e-3, "learning rate (Adam, constant, as in the course)")
    batch_size: int = option(128, "images per step")


@dataclass
class ScratchRunConfig:
    steps: int | None = option(None, "stop after this many steps (default 1000 when no budget is given)")
    epochs: float | None = option(None, "stop after this many passes over the data")
    minutes: float | None = option(None, "stop after this many minutes of training")
    seed: int = option(0, "seed for weights, data order and noise")
    sample_every: int = option(500, "write a sample grid every N steps (0 = only at the end)")
    sample_count: int = option(16, "images in each sample grid")
    sample_steps: int = option(SCRATCH_SAMPLE_STEPS, "steps of the naive sampler for the grids")
    log_every: int = option(10, "append a row to metrics.csv every N steps")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")


@dataclass
class ScratchConfig:
    data: DataConfig = field(default_factory=DataConfig)
    optim: ScratchOptimConfig = field(default_factory=ScratchOptimConfig)
    run: ScratchRunConfig = field(default_factory=ScratchRunConfig)

    def validate(self) -> ScratchConfig:
        check_choices(self)
        check_config_values(self)  # inf/nan, sizes out of range, a device not here
        r = self.run
        check_positive({
            "--lr": self.optim.lr, "--batch-size": self.optim.batch_size, "--image-size": self.data.image_size,
            "--steps": r.steps, "--epochs": r.epochs, "--minutes": r.minutes, "--sample-count": r.sample_count,
            "--sample-steps": r.sample_steps, "--log-every": r.log_every,
        })
        check_config_ranges(self)  # what the checks above leave: negative numbers, counts past memory
        return self


# Settings that may change when a run is resumed: its length, logging, evaluation, device and how
# images are held (none of which changes the weights), and the learning rate, warmup and clipping, so
# that a run that diverged can go on from its last good checkpoint. The rest must match.
RESUMABLE_CHANGES = {
    "run": {"steps", "epochs", "minutes", "sample_every", "sample_count", "sample_sampler", "sample_steps",
            "sample_cfg_scale", "eval_every", "eval_count", "log_with", "checkpoint_every", "keep_checkpoints",
            "log_every", "device"},
    "optim": {"lr", "warmup_steps", "clip_grad"},
    "data": {"memory_limit_mb"},
    "model": {"allow_pickle"},
}


# ---- fine-tuning (difflab finetune) ------------------------------------------------------------------

# What a pretrained model decides: with --from, these are read from the model (and saved so), not given.
SET_BY_BASE = {
    "model": ("preset", "schedule", "prediction", "timesteps", "conditioning", "class_method", "class_embed_dim"),
    "data": ("image_size", "channels"),
}


def finetune_defaults() -> TrainConfig:
    """`difflab train`'s defaults with a low learning rate and a short warmup: a pretrained model needs
    adjusting, not relearning."""
    config = TrainConfig()
    config.optim.lr = 1e-4
    config.optim.warmup_steps = 20
    return config


def check_choices(config) -> None:
    """Every setting that has a list of choices holds one of them."""
    for section in sections(config):
        for f in dataclasses.fields(section):
            choices, value = f.metadata["choices"], getattr(section, f.name)
            if choices is not None and value is not None and value not in choices:
                raise ConfigError(
                    f"{flag_of(f)} {value!r} is not an option; choose one of: {', '.join(map(str, choices))}"
                )


def check_positive(values: dict[str, Any]) -> None:
    """{flag: value}: each value given (not None) is greater than 0."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ConfigError(f"{name} must be greater than 0 (got {value})")


def sections(config) -> list:
    return [getattr(config, f.name) for f in dataclasses.fields(config)]


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


def differences(a, b, allowed: dict[str, set[str]] = RESUMABLE_CHANGES) -> list[str]:
    """Settings that differ between two configs, except those in `allowed`."""
    out = []
    da, db = to_dict(a), to_dict(b)
    for section in da:
        for key in sorted(set(da[section]) | set(db[section])):
            if key in allowed.get(section, ()):
                continue
            va, vb = da[section].get(key), db[section].get(key)
            if va != vb:
                out.append(f"[{section}] {key} = {va!r} (saved) vs {vb!r} (now)")
    return out


# ---- command-line flags ----------------------------------------------------------------------------

def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig, defaults=None,
                     skip: dict[str, tuple[str, ...]] | None = None) -> None:
    """One flag per config field, grouped by section. Flags left out keep the file's/default value.
    `defaults`: a config whose values --help shows (a command with defaults of its own); `skip`:
    {section: fields} that get no flag."""
    defaults = defaults if defaults is not None else cls()
    for section in dataclasses.fields(cls):
        section_cls = _field_types(cls)[section.name]
        group = parser.add_argument_group(f"[{section.name}] settings")
        types_ = _field_types(section_cls)
        for f in dataclasses.fields(section_cls):
            if f.name in (skip or {}).get(section.name, ()):
                continue
            typ = types_[f.name]
            help_ = f.metadata["help"]
            if f.metadata["choices"]:
                help_ += f" ({', '.join(map(str, f.metadata['choices']))})"
            default = getattr(getattr(defaults, section.name), f.name)
            if default is not None and default is not False:
                help_ += f"; default {default}"
            dest = f"{section.name}.{f.name}"
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
