"""difflab scratch: the from-scratch teaching model of course unit 1 (BasicUNet), trained and sampled
with the same run folder, progress bars and sample grids as the real model."""

from __future__ import annotations

from pathlib import Path

from difflab.cli.options import add_device, add_run_options, check_at_least_one


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "scratch", help="train and sample the course's from-scratch teaching model (BasicUNet)",
        description="Course unit 1's diffusion model from scratch: a 309k-parameter BasicUNet that learns to "
                    "predict clean images from images mixed with uniform noise, sampled by walking from noise "
                    "towards its prediction. See docs/from-scratch.md.",
    )
    commands = p.add_subparsers(dest="scratch_command", metavar="COMMAND", required=True)
    add_train_parser(commands)
    add_sample_parser(commands)


def add_train_parser(commands) -> None:
    from difflab.config import ScratchConfig, add_config_flags

    p = commands.add_parser(
        "train", help="train the BasicUNet on a folder or dataset",
        description="Train the teaching model. Settings come from the defaults, then --config FILE.toml, then the "
                    "flags below; the resolved settings are saved as config.toml in the run folder.",
    )
    add_run_options(p, "runs/scratch-DATA", "a scratch run's config.toml", resumable=False, memory_check=False)
    add_config_flags(p, ScratchConfig)
    p.set_defaults(run=run_train)


def add_sample_parser(commands) -> None:
    p = commands.add_parser(
        "sample", help="generate images from a trained BasicUNet",
        description="Generate images with the naive sampler from a folder written by 'difflab scratch train' "
                    "(its model/ or the run folder). Image i starts from noise drawn with seed SEED+i.",
    )
    p.add_argument("--model", required=True, help="model folder or run folder")
    p.add_argument("-n", "--count", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--steps", type=int, default=40, help="naive sampler steps (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="grid image to write (default samples.png)")
    p.add_argument("--columns", type=int, help="images per grid row (default: a square grid)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    add_device(p)
    p.set_defaults(run=run_sample)


def run_train(args) -> int:
    import logging

    from difflab.cli.train import data_name, print_outputs
    from difflab.config import ScratchConfig, apply_flags, load_config
    from difflab.training.scratch_trainer import train_scratch

    base = load_config(args.config, ScratchConfig) if args.config else ScratchConfig()
    config = apply_flags(base, args).validate()
    out = args.out or Path("runs") / f"scratch-{data_name(config.data.spec)}"
    model_dir = train_scratch(config, out, overwrite=args.overwrite)
    print_outputs(model_dir, logging.getLogger("difflab"), "BasicUNet weights as safetensors + scratch.json",
                  ["difflab", "scratch", "sample", "--model", str(model_dir), "-n", "16", "--out", "grid.png"])
    return 0


def run_sample(args) -> int:
    import logging

    from difflab.cli.checks import check_flags
    from difflab.devices import pick_device
    from difflab.images import make_grid, save_png
    from difflab.models.scratch_model import ScratchModel

    check_at_least_one(args)
    check_flags(args)  # grid columns and the output path, before any work
    model = ScratchModel.load(args.model, device=pick_device(args.device))
    images = model.generate(args.count, args.steps, seed=args.seed, batch_size=args.batch_size, progress=True)
    settings = {"model": str(args.model), "sampler": "naive", "steps": args.steps, "seed": args.seed,
                "count": args.count}
    save_png(make_grid(images, args.columns), args.out, settings)
    logging.getLogger("difflab").info("wrote %d images to %s", args.count, args.out)
    return 0
