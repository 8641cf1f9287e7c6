"""difflab quickstart: the main job on built-in data, start to finish; --text: the same for a small
text-to-image model on the built-in shapes."""

from __future__ import annotations

from pathlib import Path

# The prompt grid of --text: seen combinations, then ones held out of training (shapes.HELD_OUT).
TEXT_PROMPTS = (
    "a large red circle in the centre on a white background",
    "a small blue square at the top left on a black background",
    "a large orange triangle at the bottom right on a grey background",
    "a small purple square at the top right on a white background",
    "a large green triangle in the centre on a white background",
    "a small yellow square at the bottom left on a black background",
)
TEXT_VAE_STEPS = 600  # about a minute and a half here


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="train a class-conditional model on the built-in digits for a few minutes, sample, measure "
                           "(--text: a text-to-image model on the built-in shapes)",
        description="Train a small class-conditional model on scikit-learn's bundled digits, write a grid with one "
                    "row per digit (classifier-free guidance), evaluate it against held-out digits, and save it "
                    "as a diffusers folder with a model card. With --text: train a small latent text-to-image model "
                    "(a VAE, a tokenizer and text encoder, a cross-attention UNet) on the built-in captioned shapes "
                    "in about five minutes, write a grid of prompts (the last two ask for colour-shape pairs held out "
                    "of training), measure its prompt adherence, and save it as a StableDiffusionPipeline folder. "
                    "Replaces an earlier quickstart run in --out.",
    )
    p.add_argument("--text", action="store_true", help="the text-to-image quickstart on the built-in shapes")
    p.add_argument("--out", type=Path, help="run folder (default runs/quickstart, or runs/quickstart-text)")
    p.add_argument("--minutes", type=float, help="training time in minutes (default 3; with --text 5, its VAE stage of "
                                                 "about a minute and a half included)")
    p.add_argument("--steps", type=int, help="train for this many steps instead: the same model on any machine")
    p.add_argument("-n", "--count", type=int, help="images generated for the evaluation (default 500; --text 200)")
    p.set_defaults(run=run)


def run(args) -> int:
    import logging

    from difflab.checks import MOST
    from difflab.config import TrainConfig
    from difflab.errors import ConfigError

    log = logging.getLogger("difflab")
    count = args.count or (200 if args.text else 500)
    if not 2 <= count <= MOST["eval_count"]:  # before minutes of training, not after
        raise ConfigError(f"-n must be from 2 to {MOST['eval_count']:,} (got {count}): the Fréchet distance "
                          "compares sets of images")
    minutes = args.minutes or (5.0 if args.text else 3.0)  # --minutes bound the whole run, a VAE stage included
    config = TrainConfig()
    config.run.minutes, config.run.steps = (None, args.steps) if args.steps else (minutes, None)
    config.run.sample_every = 0
    config.run.checkpoint_every = 0
    if args.text:
        out = args.out or Path("runs/quickstart-text")
        text_settings(config)
    else:
        out = args.out or Path("runs/quickstart")
        config.data.spec = "digits"
        config.model.conditioning = "class"
        config.run.sample_count = 80  # eight per digit
    config.validate()  # --minutes, before saying what will be done
    budget = f"{args.steps} steps" if args.steps else f"{minutes:.1f} minutes"
    if args.text:
        log.info("training a text-to-image model on the built-in shapes: a VAE (%d steps), then the UNet and text "
                 "encoder, in %s", TEXT_VAE_STEPS, budget)
        return finish_text(config, out, count, log)
    log.info("training a class-conditional diffusion model on the built-in digits for %s", budget)
    return finish_digits(config, out, count, log)


def text_settings(config) -> None:
    config.data.spec = "shapes"
    config.model.conditioning = "text"
    config.vae.steps = TEXT_VAE_STEPS
    config.run.sample_prompts = " | ".join(TEXT_PROMPTS)
    config.run.sample_count = 4 * len(TEXT_PROMPTS)  # four seeds per prompt


def finish_digits(config, out: Path, count: int, log) -> int:
    import json

    from difflab.cli.train import print_run_outputs
    from difflab.metrics.evaluate import Evaluator, summary_line
    from difflab.storage.folder import load_model
    from difflab.training.trainer import train

    model_dir = train(config, out, overwrite=True)
    run = config.run
    model = load_model(model_dir)
    evaluator = Evaluator.for_data("digits", model.info.image_size, model.info.channels)
    result = evaluator(model, count, sampler=run.sample_sampler, steps=run.sample_steps,
                       cfg_scale=model.default_cfg_scale, progress=True)
    result["frechet_floor"] = evaluator.floor(count)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print_run_outputs(config, model_dir)
    log.info("eval:     %s", out / "eval.json")
    log.info("%s", summary_line(result))
    return 0


def finish_text(config, out: Path, count: int, log) -> int:
    import json

    from difflab.cli.train import print_run_outputs
    from difflab.metrics.prompt_adherence import adherence_line, evaluate_prompts, record_evaluation
    from difflab.storage.folder import load_model
    from difflab.training.trainer import train

    model_dir = train(config, out, overwrite=True)
    model = load_model(model_dir)
    result = evaluate_prompts(model, count, sampler=config.run.sample_sampler, steps=config.run.sample_steps,
                              cfg_scale=None, progress=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    record_evaluation(model_dir, result)
    print_run_outputs(config, model_dir)
    log.info("eval:     %s", out / "eval.json")
    log.info("prompt adherence: %s", adherence_line(result))
    log.info("Fréchet distance %.3f (real-data floor %.3f)", result["frechet_distance"], result["frechet_floor"])
    return 0
