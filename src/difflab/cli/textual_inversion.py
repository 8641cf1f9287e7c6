"""difflab textual-inversion: teach a text-to-image model a new word from a few images, training only that
word's embedding rows (the same trainer as difflab dreambooth, with another choice of what trains)."""

from __future__ import annotations

from pathlib import Path

from difflab.cli.dreambooth import HELPS as DREAMBOOTH_HELPS
from difflab.cli.dreambooth import argparse_suppress
from difflab.cli.options import add_run_options, starting_config
from difflab.config import (
    TextualInversionConfig,
    add_config_flags,
    apply_flags,
    settings_marked,
    textual_inversion_defaults,
)

# Settings a textual inversion run does not take as flags: what the base model decides, what its own flags
# say (--model, --data, --validation-prompt), what it never trains (LoRA, the text encoder, a new VAE).
SKIPPED = {section: set(names) for section, names in settings_marked(TextualInversionConfig, "set_by_base").items()}
SKIPPED["data"] |= {"spec", "split", "caption_column", "caption_template"}
SKIPPED["model"] |= {"base", "lora_rank", "vae", "text_encoder", "train_text_encoder", "cond_dropout"}
SKIPPED["run"] |= {"sample_prompts", "eval_every", "eval_count"}
SKIPPED["vae"] = {"steps", "minutes", "lr", "batch_size", "kl_weight", "detail_weight"}
SKIPPED["textual_inversion"] = {"token", "init_word", "num_vectors", "what"}  # declared below, with short help
HELPS = {"model.allow_pickle": DREAMBOOTH_HELPS["model.allow_pickle"]}  # train's words name --from


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "textual-inversion", help="teach a text-to-image model a new word (<my-thing>) from a few images",
        description="Textual inversion: add a token to a text-to-image model's tokenizer and learn only its "
                    "embedding rows from a few images (captions from diffusers' object or style templates), every "
                    "other weight frozen. The run saves learned_embeds.safetensors, which difflab sample --embedding "
                    "and diffusers' load_textual_inversion read. It is difflab train's loop (checkpoints holding only "
                    "the new rows, --resume, validation grids in samples/, metrics.csv). Defaults follow diffusers' "
                    "textual_inversion.py as its README runs it: 3,000 steps of 4 images, learning rate 2e-3 "
                    "(5e-4 scaled by 4 images), constant, AdamW weight decay 1e-2, random flips, no clipping.",
    )
    p.add_argument("--model", dest="model.base", metavar="MODEL", default=argparse_suppress(),
                   help="the text-to-image model to teach")
    p.add_argument("--data", dest="data.spec", metavar="FOLDER", default=argparse_suppress(),
                   help="the folder of the subject's (or the style's) images; 3 to 5 is typical")
    p.add_argument("--token", dest="textual_inversion.token", metavar="TOKEN", default=argparse_suppress(),
                   help='the new token, such as "<my-thing>": a string the tokenizer does not hold')
    p.add_argument("--init-word", dest="textual_inversion.init_word", metavar="WORD", default=argparse_suppress(),
                   help="a word the tokenizer holds whole, for what the images show (dog, shape, painting): the "
                        "token's rows start from its embedding")
    p.add_argument("--num-vectors", dest="textual_inversion.num_vectors", type=int, metavar="N",
                   default=argparse_suppress(),
                   help="embedding rows the token learns (default 1; more hold more, and take more of the prompt)")
    p.add_argument("--what", dest="textual_inversion.what", choices=("object", "style"), default=argparse_suppress(),
                   help="caption templates: object ('a photo of a TOKEN', ...) or style ('a painting in the style of "
                        "TOKEN', ...) (default object)")
    p.add_argument("--validation-prompt", dest="run.sample_prompts", metavar="PROMPT", default=argparse_suppress(),
                   help="prompts of the validation grids in samples/ (fixed seeds), separated by | (default: "
                        "captions of the run)")
    add_run_options(p, "runs/textual-inversion")
    add_config_flags(p, TextualInversionConfig, defaults=textual_inversion_defaults(), skip=SKIPPED,
                     helps=HELPS)
    p.set_defaults(run=run)


def resolve_config(args) -> tuple[TextualInversionConfig, Path]:
    """Defaults, then --config (or, resuming, the run's own config.toml), then flags."""
    base, _ = starting_config(args, textual_inversion_defaults(), TextualInversionConfig)
    return apply_flags(base, args).validate(), args.out or Path("runs") / "textual-inversion"


def run(args) -> int:
    import logging

    from difflab.training.textual_inversion import textual_inversion

    config, out = resolve_config(args)
    model_dir = textual_inversion(config, out, resume=args.resume, overwrite=args.overwrite, yes=args.yes)
    log, token = logging.getLogger("difflab"), config.textual_inversion.token
    log.info("embedding: %s  (learned_embeds.safetensors with a model card)", model_dir)
    grids = sorted((out / "samples").glob("step_*.png"))
    if grids:
        log.info("samples:  %s", grids[-1])
    log.info("use it with: difflab sample --model %s --embedding %s --prompt \"a photo of %s\"", config.model.base,
             out, token)
    return 0
