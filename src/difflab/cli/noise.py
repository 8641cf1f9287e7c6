"""difflab noise: show how a noise schedule destroys images (the course's "add noise" exercise)."""

from __future__ import annotations

from pathlib import Path

from difflab.data import DATA_SPEC_HELP
from difflab.models.schedules import SCHEDULES

MAX_FIGURE_SIDE = 64  # rows and columns of the figure: more would not be readable


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "noise", help="draw images noised at evenly spaced timesteps, with the schedule's curves",
        description="Noise a few training images with q(x_t | x_0) at evenly spaced timesteps and plot "
                    "sqrt(alpha_bar) and sqrt(1 - alpha_bar) for the schedule.",
    )
    p.add_argument("--data", default="digits", help=f"{DATA_SPEC_HELP} (default digits)")
    p.add_argument("--schedule", default="linear", help=f"one of {', '.join(SCHEDULES)} (default linear)")
    p.add_argument("--out", type=Path, default=Path("noise.png"), help="figure to write (default noise.png)")
    p.add_argument("--images", type=int, default=3, help="rows: how many images (default 3)")
    p.add_argument("--columns", type=int, default=8, help="timesteps per row (default 8)")
    p.add_argument("--timesteps", type=int, default=1000, help="training timesteps of the schedule (default 1000)")
    p.add_argument("--image-size", type=int, help="resize images to this (default: the data's own)")
    p.add_argument("--seed", type=int, default=0, help="seed for the noise (default 0)")
    p.set_defaults(run=run)


def run(args) -> int:
    import logging

    import torch

    from difflab.checks import check_image_size, check_timesteps
    from difflab.data import open_dataset
    from difflab.errors import ConfigError
    from difflab.files import check_output_file
    from difflab.models.schedules import noise_scheduler
    from difflab.plots import noise_figure

    check_timesteps(args.timesteps)
    check_image_size(args.image_size)
    if not (1 <= args.images <= MAX_FIGURE_SIDE and 2 <= args.columns <= min(MAX_FIGURE_SIDE, args.timesteps)):
        raise ConfigError(f"--images must be from 1 to {MAX_FIGURE_SIDE}, and --columns from 2 to "
                          f"{min(MAX_FIGURE_SIDE, args.timesteps)} (at most --timesteps, {args.timesteps})")
    check_output_file(args.out, "--out")
    schedule = noise_scheduler(args.schedule, timesteps=args.timesteps)
    data = open_dataset(args.data, args.image_size, split="all")
    picks = torch.linspace(0, len(data) - 1, args.images).long()
    x0 = data.batch(picks)["images"]
    timesteps = torch.linspace(0, args.timesteps - 1, args.columns).round().long()
    noise = torch.randn((args.images, args.columns, *x0.shape[1:]), generator=torch.Generator().manual_seed(args.seed))
    noised = torch.stack([schedule.add_noise(x0, noise[:, c], timesteps[c].repeat(args.images))
                          for c in range(args.columns)], dim=1)
    noise_figure((noised + 1) / 2, timesteps.tolist(), schedule.alphas_cumprod, args.schedule, args.out)
    logging.getLogger("difflab").info("wrote %s", args.out)
    return 0
