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
from difflab.cpu_threads import set_threads
from difflab.errors import DifflabError

COMMANDS = ["quickstart", "train", "finetune", "dreambooth", "textual-inversion", "sample", "eval", "noise", "scratch",
            "demo", "push", "export"]
NO_COMPUTE = {"push", "export"}  # the commands that run no network take no --threads


class Parser(argparse.ArgumentParser):
    """argparse, with its errors kept to one line and a pointer to --help: its default prints the
    whole usage first, which for `difflab train` is dozens of lines above the one that matters."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="difflab",
        description="Train, sample, guide, condition, fine-tune and share image diffusion models.",
        epilog="Run 'difflab COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"difflab.cli.{name.replace('-', '_')}").add_parser(subparsers)
        if name not in NO_COMPUTE:
            subparsers.choices[name].add_argument(
                "--threads", type=int, metavar="N",
                help="CPU threads (default: the cores that other work leaves free, by the load average; all of "
                     "them on an idle machine, or OMP_NUM_THREADS when set)")
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
    for name in ("diffusers", "transformers", "accelerate", "huggingface_hub", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # These libraries set their loggers' level when they are imported, which is later (inside a command):
    # their own settings say it. Offline, huggingface_hub's retries would print ten lines before the error.
    for library in ("HF_HUB", "DATASETS", "TRANSFORMERS", "DIFFUSERS"):
        os.environ.setdefault(f"{library}_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    try:
        note = set_threads(getattr(args, "threads", None))
        if note:
            logging.getLogger("difflab").info(note)
        return args.run(args) or 0
    except DifflabError as e:
        print(f"difflab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C; SIGTERM and SIGHUP during training (training/signals.py)
        print(f"difflab: stopped by {e}" if str(e) else "difflab: interrupted", file=sys.stderr)
        return getattr(e, "exit_status", 130)
