"""difflab train: train a diffusion model from scratch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from difflab.cli.options import add_run_options, starting_config
from difflab.config import TrainConfig, add_config_flags, apply_flags, flag_of, given_flags
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
    base, _ = starting_config(args, defaults or TrainConfig())
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


def sample_command(config: TrainConfig, model_dir: Path) -> list[str]:
    """The command that samples what a training run saved, as words: a LoRA on its base model, a text model
    with a prompt (DreamBooth's instance prompt, or the run's first validation prompt), any other model as
    it is. tests/test_run_mistakes.py runs each such command as printed."""
    m = config.model
    prompt = getattr(getattr(config, "dreambooth", None), "instance_prompt", None)
    prompt = prompt or next((p.strip() for p in (config.run.sample_prompts or "").split("|") if p.strip()), "...")
    if m.lora_rank:
        return ["difflab", "sample", "--model", str(m.base), "--lora", str(model_dir), "--prompt", prompt,
                "-n", "4", "--out", "grid.png"]
    command = ["difflab", "sample", "--model", str(model_dir)]
    if (model_dir / "text_encoder").is_dir():  # what was saved decides (a fine-tuned base's kind is its own)
        command += ["--prompt", prompt]
    return command + ["-n", "16", "--out", "grid.png"]


def output_kind(config: TrainConfig, model_dir: Path) -> str:
    if config.model.lora_rank:
        return "LoRA: pytorch_lora_weights.safetensors with a model card"
    if (model_dir / "text_encoder").is_dir():
        if not (model_dir / "vae").is_dir():  # pixel space: no diffusers pipeline takes it
            return "a pixel-space text-to-image folder for difflab, with a model card"
        return "StableDiffusionPipeline folder with a model card"
    return "diffusers DDPMPipeline folder with a model card"


def print_outputs(model_dir: Path, log, kind: str, command: list[str]) -> None:
    """Where a run's outputs are, and the command (quoted for a shell) that samples more."""
    import shlex

    run = model_dir.parent
    grids = sorted((run / "samples").glob("step_*.png"))
    log.info("model:    %s  (%s)", model_dir, kind)
    if grids:
        log.info("samples:  %s", grids[-1])
    log.info("metrics:  %s, %s", run / "metrics.csv", run / "loss.png")
    log.info("sample more with: %s", shlex.join(command))


def print_run_outputs(config: TrainConfig, model_dir: Path) -> None:
    import logging

    print_outputs(model_dir, logging.getLogger("difflab"), output_kind(config, model_dir),
                  sample_command(config, model_dir))


def run(args) -> int:
    from difflab.training.trainer import train

    config, out = resolve_config(args)
    print_run_outputs(config, train(config, out, resume=args.resume, overwrite=args.overwrite, yes=args.yes))
    return 0
