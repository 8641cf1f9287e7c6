"""Command-line options that several sub-commands share, declared once."""

from __future__ import annotations

from pathlib import Path

from difflab.errors import ConfigError
from difflab.layout import RUN_CONFIG, is_run_folder

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps (default auto)"
ALLOW_PICKLE_HELP = "load .bin/.ckpt weights (with torch.load(weights_only=True)) when there are no safetensors"


def starting_config(args, defaults, config_class=None):
    """What a training command's flags then change: --config, else (resuming) the run's own config.toml, so
    that a run resumes as it was set up, else the command's `defaults`. Returns (config, from_defaults)."""
    from difflab.config import TrainConfig, load_config

    config_class = config_class or TrainConfig
    if args.config:
        return load_config(args.config, config_class), False
    if args.resume and args.out and is_run_folder(args.out):
        return load_config(args.out / RUN_CONFIG, config_class), False
    return defaults, True


def add_device(parser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_model_loading(parser) -> None:
    """--device and --allow-pickle, for commands that load a model folder."""
    add_device(parser)
    parser.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)


def add_run_options(parser, out_default: str, config_example: str = "a run's config.toml", *,
                    resumable: bool = True, memory_check: bool = True) -> None:
    """--out, --config, --resume (for runs that can be resumed), --overwrite: how a training command
    finds its run folder and settings; and --yes for the trainer's memory check (`memory_check`)."""
    parser.add_argument("--out", type=Path, help=f"run folder (default: {out_default})")
    parser.add_argument("--config", type=Path, help=f"TOML file of settings (for example {config_example})")
    if resumable:
        parser.add_argument("--resume", action="store_true",
                            help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start again")
    if memory_check:
        parser.add_argument("--yes", action="store_true",
                            help="start even when the estimated peak memory exceeds what the device has free")


def check_at_least_one(args, names: tuple[str, ...] = ("count", "steps", "batch_size")) -> None:
    """Counts a command takes (images, sampler steps, batch size) are each at least 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")


def add_cfg_options(parser) -> None:
    """--cfg-interval and --cfg-rescale, beside --cfg-scale (diffusion/cfg.py)."""
    parser.add_argument("--cfg-interval", metavar="LOW-HIGH",
                        help="classifier-free guidance only at noise levels sigma in (LOW, HIGH] (Kynkäänniemi et "
                             "al. 2024), plain conditional elsewhere: keeps the variety of strong guidance; e.g. "
                             "0.3-5 or 1-inf (default: the model's; every step)")
    parser.add_argument("--cfg-rescale", type=float, metavar="PHI",
                        help="guidance rescale in [0, 1] (Lin et al. 2023, diffusers' guidance_rescale): gives the "
                             "guided prediction the conditional one's spread; 0.7 is the paper's (default: the "
                             "model's; 0)")
