"""difflab quickstart: the main job on built-in data, start to finish."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="train a class-conditional model on the built-in digits for a few minutes, sample, measure",
        description="Train a small class-conditional model on scikit-learn's bundled digits, write a grid with one "
                    "row per digit (classifier-free guidance), evaluate it against held-out digits, and save it "
                    "as a diffusers folder with a model card. Replaces an earlier quickstart run in --out.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="run folder (default runs/quickstart)")
    p.add_argument("--minutes", type=float, default=3.0, help="training time in minutes (default 3)")
    p.add_argument("--steps", type=int, help="train for this many steps instead: the same model on any machine")
    p.add_argument("-n", "--count", type=int, default=500, help="images generated for the evaluation (default 500)")
    p.set_defaults(run=run)


def run(args) -> int:
    import json
    import logging

    from difflab.checks import MOST
    from difflab.cli.train import print_outputs
    from difflab.config import TrainConfig
    from difflab.errors import ConfigError
    from difflab.metrics.evaluate import Evaluator, summary_line
    from difflab.pipelines.folder import load_model
    from difflab.training.trainer import train

    log = logging.getLogger("difflab")
    if not 2 <= args.count <= MOST["eval_count"]:  # before minutes of training, not after
        raise ConfigError(f"-n must be from 2 to {MOST['eval_count']:,} (got {args.count}): the Fréchet distance "
                          "compares sets of images")
    config = TrainConfig()
    config.data.spec = "digits"
    config.model.conditioning = "class"
    config.run.minutes, config.run.steps = (None, args.steps) if args.steps else (args.minutes, None)
    config.run.sample_every = 0
    config.run.checkpoint_every = 0
    config.run.sample_count = 80  # eight per digit
    config.validate()  # --minutes, before saying what will be done
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:.1f} minutes"
    log.info("training a class-conditional diffusion model on the built-in digits for %s", budget)
    model_dir = train(config, args.out, overwrite=True)

    run = config.run
    model = load_model(model_dir)
    evaluator = Evaluator.for_data("digits", model.info.image_size, model.info.channels)
    result = evaluator(model, args.count, sampler=run.sample_sampler, steps=run.sample_steps,
                       cfg_scale=model.default_cfg_scale, progress=True)
    result["frechet_floor"] = round(evaluator.floor(args.count), 4)
    (args.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print_outputs(model_dir, log)
    log.info("eval:     %s", args.out / "eval.json")
    log.info("%s", summary_line(result))
    return 0
