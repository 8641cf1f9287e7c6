"""The `difflab` command: parses arguments, then calls the library.

Each sub-command lives in its own module with `add_parser(subparsers)` and `run(args)`. Heavy
libraries are imported inside `run`, so `difflab --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from difflab import __version__
from difflab.errors import DifflabError

COMMANDS = ["quickstart", "train", "finetune", "sample", "eval", "noise", "scratch", "demo", "push"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difflab",
        description="Train, sample, guide, condition, fine-tune and share image diffusion models.",
        epilog="Run 'difflab COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"difflab.cli.{name.replace('-', '_')}").add_parser(subparsers)
    return parser


def setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("difflab: %(message)s"))
    logger = logging.getLogger("difflab")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    if quiet:
        os.environ["DIFFLAB_QUIET"] = "1"  # progress bars too (see progress.py)
    # Libraries' own chatter (deprecations of their internals) is not the user's business.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("diffusers", "transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
        # transformers and diffusers set their level when first imported, which is later: tell them then.
        os.environ.setdefault(f"{name.upper()}_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    try:
        return args.run(args) or 0
    except DifflabError as e:
        print(f"difflab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return 130
