"""difflab finetune: fine-tune a pretrained diffusion model on new images (course unit 2).

The same trainer as `difflab train`, started from the pretrained weights and noise schedule, with
fine-tuning defaults (a low learning rate, a short warmup).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from difflab.cli.options import add_run_options
from difflab.config import TrainConfig, VaeConfig, add_config_flags, finetune_defaults, settings_marked
from difflab.errors import ConfigError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a pretrained diffusion model on a folder or dataset",
        description="Fine-tune a pretrained diffusion model (a difflab model or run folder, a diffusers "
                    "DDPMPipeline/DDIMPipeline folder, a text-to-image StableDiffusionPipeline folder, or a Hub id "
                    "such as google/ddpm-celebahq-256) on new images (captioned, for a text-to-image model: its "
                    "VAE stays frozen, and its text encoder unless --train-text-encoder). It is difflab train's "
                    "loop (EMA, accumulation, checkpoints, --resume, sample grids, evaluations) started from the "
                    "model's weights and noise schedule; images are resized "
                    "to the model's size and converted to its channels. Settings come from the fine-tuning "
                    "defaults, then --config FILE.toml, then the flags below; the resolved settings are saved as "
                    "config.toml in the run folder (difflab train --config runs/NAME/config.toml runs it again).",
    )
    add_run_options(p, "runs/DATA-finetune")
    skip = settings_marked(TrainConfig, "set_by_base")
    skip["vae"] = {f.name for f in dataclasses.fields(VaeConfig)}  # a base model brings its VAE
    skip["model"] |= {"vae", "text_encoder"}
    add_config_flags(p, defaults=finetune_defaults(), skip=skip, helps={
        "model.train_text_encoder": "text-to-image models: train the base model's text encoder too; default: no"})
    p.set_defaults(run=run)


def run(args) -> int:

    from difflab.cli.train import data_name, print_run_outputs, resolve_config
    from difflab.training.trainer import train

    config, out = resolve_config(args, finetune_defaults())
    if not config.model.base:
        raise ConfigError("give the pretrained model to start from with --from MODEL (a model or run folder, a "
                          "diffusers DDPMPipeline folder, or a Hub id)")
    if args.out is None:
        out = Path("runs") / f"{data_name(config.data.spec)}-finetune"
    print_run_outputs(config, train(config, out, resume=args.resume, overwrite=args.overwrite, yes=args.yes))
    return 0
