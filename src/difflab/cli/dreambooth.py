"""difflab dreambooth: teach a text-to-image model a subject from a few images (course unit 3).

The same trainer as `difflab finetune`, on the subject's images (and, with prior preservation, class
images), with DreamBooth's defaults; `--lora` trains adapters instead of the whole UNet.
"""

from __future__ import annotations

from pathlib import Path

from difflab.cli.options import add_run_options, starting_config
from difflab.config import (
    DreamBoothConfig,
    add_config_flags,
    apply_flags,
    dreambooth_defaults,
    settings_marked,
)
from difflab.errors import ConfigError

DEFAULT_RANK = 4

# Settings a DreamBooth run does not take as flags: what the base model decides, what its own flags say
# (--model, --lora/--rank, --validation-prompt, --instance-data), and the parts of a new text model.
SKIPPED = {section: set(names) for section, names in settings_marked(DreamBoothConfig, "set_by_base").items()}
SKIPPED["data"] |= {"spec", "split", "caption_column", "caption_template"}
SKIPPED["model"] |= {"base", "lora_rank", "vae", "text_encoder", "cond_dropout"}
SKIPPED["run"] |= {"sample_prompts", "eval_every", "eval_count"}
SKIPPED["vae"] = {"steps", "minutes", "lr", "batch_size", "kl_weight", "detail_weight"}

# What DreamBooth's --help says where train's words would name flags it does not have, or defaults it does
# not use.
HELPS = {
    "optim.lr": "peak learning rate (AdamW); default: 1/20 of the base model's own for a full fine-tune (5e-6 for "
                "Stable Diffusion), as much as it with --lora (1e-4 for Stable Diffusion)",
    "model.allow_pickle": "let --model load weights stored as a pickle (.bin), with torch.load(weights_only=True)",
    "model.train_text_encoder": "train the base model's text encoder too (with --lora: adapters on it); default: no",
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "dreambooth", help="teach a text-to-image model a new subject from a few images (DreamBooth, LoRA)",
        description="DreamBooth: fine-tune a text-to-image model (a Stable Diffusion folder, a difflab text-to-image "
                    "model or run folder, or a Hub id) on a few images of one subject bound to a rare token "
                    '("a photo of sks dog"), optionally with prior preservation (class images generated once by '
                    "the base model, or --class-data) and as LoRA adapters. It is difflab train's loop "
                    "(checkpoints, --resume, validation grids in samples/, metrics.csv with the instance and prior "
                    "losses). Defaults follow diffusers' DreamBooth scripts: 400 steps of 2 images, constant "
                    "learning rate, no EMA; the learning rate is 1/20 of the base model's own for a full fine-tune "
                    "(5e-6 for Stable Diffusion) and the same as it for LoRA (1e-4).",
    )
    p.add_argument("--model", dest="model.base", metavar="MODEL", default=argparse_suppress(),
                   help="the text-to-image model to teach")
    p.add_argument("--lora", action="store_true",
                   help="train LoRA adapters (saved as pytorch_lora_weights.safetensors) instead of every UNet weight")
    p.add_argument("--lora-rank", "--rank", dest="model.lora_rank", type=int, metavar="INT",
                   default=argparse_suppress(),
                   help=f"with --lora: the adapters' rank, at most the width of the layers they adapt (default "
                        f"{DEFAULT_RANK}; --rank is the same flag)")
    p.add_argument("--validation-prompt", dest="run.sample_prompts", metavar="PROMPT", default=argparse_suppress(),
                   help="prompts of the validation grids in samples/ (fixed seeds), separated by | (default: the "
                        "instance prompt and the class prompt)")
    add_run_options(p, "runs/dreambooth")
    add_config_flags(p, DreamBoothConfig, defaults=dreambooth_defaults(), skip=SKIPPED, helps=HELPS)
    p.set_defaults(run=run)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def resolve_config(args) -> tuple[DreamBoothConfig, Path]:
    """Defaults (with the learning rate chosen from the base model), then --config, then flags."""
    from difflab.training.dreambooth import base_training_info, default_lr

    base, fresh = starting_config(args, dreambooth_defaults(), DreamBoothConfig)
    config = apply_flags(base, args)
    if "model.lora_rank" in vars(args) and not args.lora:
        raise ConfigError("--lora-rank is the rank of LoRA adapters: add --lora")
    if args.lora and config.model.lora_rank is None:
        config.model.lora_rank = DEFAULT_RANK
    if fresh and "optim.lr" not in vars(args) and config.model.base:
        config.optim.lr = default_lr(base_training_info(config.model.base), bool(config.model.lora_rank))
    return config.validate(), args.out or Path("runs") / "dreambooth"


def run(args) -> int:
    import logging

    from difflab.cli.train import print_run_outputs
    from difflab.training.dreambooth import dreambooth

    config, out = resolve_config(args)
    print_run_outputs(config, dreambooth(config, out, resume=args.resume, overwrite=args.overwrite, yes=args.yes))
    if config.model.lora_rank:
        logging.getLogger("difflab").info("(the command above samples the LoRA applied to its base model; "
                                          "--lora-scale sets its weight)")
    return 0
