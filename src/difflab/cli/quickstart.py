"""difflab quickstart: the main job on built-in data, start to finish."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="train a small model on the built-in digits for a couple of minutes and sample it",
        description="Train a small unconditional model on scikit-learn's bundled digits, write sample grids, "
                    "and save the model as a diffusers folder. Replaces an earlier quickstart run in --out.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="run folder (default runs/quickstart)")
    p.add_argument("--minutes", type=float, default=2.0, help="training time in minutes (default 2)")
    p.set_defaults(run=run)


def run(args) -> int:
    import logging

    from difflab.cli.train import print_outputs
    from difflab.config import TrainConfig
    from difflab.training.trainer import train

    log = logging.getLogger("difflab")
    config = TrainConfig()
    config.data.spec = "digits"
    config.model.preset = "small"
    config.run.minutes = args.minutes
    config.run.sample_every = 0
    config.run.checkpoint_every = 0
    log.info("training a small diffusion model on the built-in digits for %.1f minutes", args.minutes)
    model_dir = train(config, args.out, overwrite=True)
    print_outputs(model_dir, log)
    return 0
