"""difflab train: train a diffusion model from scratch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from difflab.cli.options import add_run_options
from difflab.config import TrainConfig, add_config_flags, apply_flags, flag_of, given_flags, load_config
from difflab.errors import ConfigError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a diffusion model from scratch on a folder or dataset",
        description="Train a diffusion model. Settings come from the defaults, then --config FILE.toml, "
                    "then the flags below; the resolved settings are saved as config.toml in the run folder.",
    )
    add_run_options(p, "runs/DATA-MODEL")
    add_config_flags(p)
    p.set_defaults(run=run)


def data_name(spec: str) -> str:
    """A short name for a data spec, for default run folders: mnist:/data/mnist -> mnist."""
    return Path(spec.split(":", 1)[-1].rstrip("/")).name or "data"


def default_out(config: TrainConfig) -> Path:
    return Path("runs") / f"{data_name(config.data.spec)}-{Path(config.model.preset).stem}"


def resolve_config(args, defaults: TrainConfig | None = None) -> tuple[TrainConfig, Path]:
    if args.config:
        base = load_config(args.config)
    elif args.resume and args.out and (args.out / "config.toml").is_file():
        base = load_config(args.out / "config.toml")  # resume a run as it was set up
    else:
        base = defaults or TrainConfig()
    config = apply_flags(base, args).validate()
    check_not_set_by_base(config, args)
    return config, args.out or default_out(config)


def check_not_set_by_base(config: TrainConfig, args) -> None:
    """With --from, the network, schedule, image size and channels are the pretrained model's."""
    if not config.model.base:
        return
    given = given_flags(args)
    for section in dataclasses.fields(config):
        for f in dataclasses.fields(getattr(config, section.name)):
            if f.metadata["set_by_base"] and f"{section.name}.{f.name}" in given:
                raise ConfigError(f"{flag_of(f)} cannot be set when fine-tuning: the model given with --from "
                                  "decides it")


def print_outputs(model_dir: Path, log, kind: str = "diffusers DDPMPipeline folder with a model card",
                  sample_command: str = "difflab sample") -> None:
    run = model_dir.parent
    grids = sorted((run / "samples").glob("step_*.png"))
    log.info("model:    %s  (%s)", model_dir, kind)
    if grids:
        log.info("samples:  %s", grids[-1])
    log.info("metrics:  %s, %s", run / "metrics.csv", run / "loss.png")
    log.info("sample more with: %s --model %s -n 16 --out grid.png", sample_command, model_dir)


def run(args) -> int:
    import logging

    from difflab.training.trainer import train

    config, out = resolve_config(args)
    model_dir = train(config, out, resume=args.resume, overwrite=args.overwrite)
    if config.model.conditioning == "text":
        print_outputs(model_dir, logging.getLogger("difflab"), "StableDiffusionPipeline folder with a model card",
                      'difflab sample --prompt "..."')
    else:
        print_outputs(model_dir, logging.getLogger("difflab"))
    return 0
