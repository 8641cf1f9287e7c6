"""Command-line options that several sub-commands share, declared once."""

from __future__ import annotations

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps (default auto)"
ALLOW_PICKLE_HELP = "load .bin/.ckpt weights (with torch.load(weights_only=True)) when there are no safetensors"


def add_device(parser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_model_loading(parser) -> None:
    """--device and --allow-pickle, for commands that load a model folder."""
    add_device(parser)
    parser.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
