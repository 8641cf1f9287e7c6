"""difflab quickstart: the main job on built-in data, start to finish; --text: the same for a small
text-to-image model on the built-in shapes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

DIGITS_GRID = 80  # the digits quickstart's grid: eight images per digit

# The prompt grid of --text: seen combinations, then ones held out of training (shapes.HELD_OUT).
TEXT_PROMPTS = (
    "a large red circle in the centre on a white background",
    "a small blue square at the top left on a black background",
    "a large orange triangle at the bottom right on a grey background",
    "a small purple square at the top right on a white background",
    "a large green triangle in the centre on a white background",
    "a small yellow square at the bottom left on a black background",
)
# --text trains a fixed number of steps, said before it starts, so that the quality does not depend on
# how busy the machine is (a wall-clock budget gave a slow or busy one blobs: issue 30). Where the full
# plan (the `small` model, about today's 3.5 minutes on two free cores) fits PROMISED_MINUTES, it runs;
# elsewhere the `quick` model (a UNet a quarter the size, a cheaper VAE); where even that takes over
# TOO_SLOW_MINUTES, fewer of its steps, with a warning. docs/benchmarks.md, "quickstart --text".
FULL_PLAN = {"preset": "small", "batch_size": 64, "vae_steps": 600, "steps": 800}
QUICK_PLAN = {"preset": "quick", "batch_size": 32, "vae_steps": 1200, "steps": 1000,
              "lr": 2e-3}  # twice the default: 1,000 steps of a small UNet gain from it (docs/benchmarks.md)
PROMISED_MINUTES = 8
TOO_SLOW_MINUTES = 12
LEAST_SHARE = 0.25  # below a quarter of the steps the grid is blobs: then take longer instead


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="train a class-conditional model on the built-in digits for a few minutes, sample, measure "
                           "(--text: a text-to-image model on the built-in shapes)",
        description="Train a small class-conditional model on scikit-learn's bundled digits, write a grid with one "
                    "row per digit (classifier-free guidance), evaluate it against held-out digits, and save it "
                    "as a diffusers folder with a model card. With --text: train a small latent text-to-image model "
                    "(a VAE, a tokenizer and text encoder, a cross-attention UNet) on the built-in captioned shapes "
                    "for a fixed number of steps (it says first how long that takes on this machine, and trains a "
                    "smaller model where the full one would take over 8 minutes), write a grid of prompts (the "
                    "last two ask for colour-shape pairs held out of training), measure its prompt adherence, and "
                    "save it as a StableDiffusionPipeline folder. Replaces an earlier quickstart run in --out.",
    )
    p.add_argument("--text", action="store_true", help="the text-to-image quickstart on the built-in shapes")
    p.add_argument("--out", type=Path, help="run folder (default runs/quickstart, or runs/quickstart-text)")
    p.add_argument("--minutes", type=float, help="training time in minutes (default 3; with --text: a wall-clock "
                                                 "budget instead of a number of steps, its VAE stage included)")
    p.add_argument("--steps", type=int, help="train for this many steps instead: the same model on any machine "
                                             "(--text: the full model's UNet steps; by default the plan is picked "
                                             "by a short measurement and said before it starts)")
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
    config = TrainConfig()
    config.run.sample_every = 0
    config.run.checkpoint_every = 0
    if args.text:
        out = args.out or Path("runs/quickstart-text")
        text_settings(config)
        steps = args.steps or config.run.steps
        config.run.minutes, config.run.steps = (args.minutes, None) if args.minutes else (None, steps)
        config.validate()  # --minutes and --steps, before minutes of measuring and training
        if not args.minutes:
            plan_text_run(config, count, chosen=args.steps is not None, log=log)
        budget = f"{args.minutes:.1f} minutes" if args.minutes else f"{config.run.steps:,} steps"
        log.info("training a text-to-image model on the built-in shapes: a VAE (%s steps), then the UNet and "
                 "text encoder for %s", f"{config.vae.steps:,}", budget)
        return finish_text(config, out, count, log)
    out = args.out or Path("runs/quickstart")
    minutes = args.minutes or 3.0
    config.run.minutes, config.run.steps = (None, args.steps) if args.steps else (minutes, None)
    config.data.spec = "digits"
    config.model.conditioning = "class"
    config.run.sample_count = DIGITS_GRID
    config.validate()  # --minutes, before saying what will be done
    budget = f"{args.steps} steps" if args.steps else f"{minutes:.1f} minutes"
    log.info("training a class-conditional diffusion model on the built-in digits for %s", budget)
    return finish_digits(config, out, count, log)


def text_settings(config) -> None:
    config.data.spec = "shapes"
    config.model.conditioning = "text"
    use_plan(config, FULL_PLAN)
    config.run.sample_prompts = " | ".join(TEXT_PROMPTS)
    config.run.sample_count = 4 * len(TEXT_PROMPTS)  # four seeds per prompt


def use_plan(config, plan: dict) -> None:
    config.model.preset, config.optim.batch_size = plan["preset"], plan["batch_size"]
    config.vae.steps, config.run.steps = plan["vae_steps"], plan["steps"]
    config.optim.lr = plan.get("lr", config.optim.lr)


# What a text quickstart's parts cost beyond the stand-ins timed before it starts (docs/benchmarks.md,
# "quickstart --text": the measured runs against their estimates).
TRAINER_STEP_FACTOR = 1.3  # a trainer's step: its text encoder, EMA, gradient clipping, batch
SETUP_SECONDS = 30.0  # importing, drawing the data, caching its latents, saving the model
EVAL_FACTOR = 1.2  # decoding, reading, the VAE's ceiling and the Fréchet distance, beside the UNet passes
READER_FACTOR = 1.2  # drawing the reader's 7,000 images beside its steps


@dataclass(frozen=True)
class TextSpeed:
    """Seconds on this machine for the parts of a text quickstart, from stand-ins timed before it starts."""

    vae_step: float
    unet_step: float
    evaluation: float
    reader: float  # training the attribute reader once (0 when it is cached)

    def seconds(self, vae_steps: int, steps: int) -> float:
        return (SETUP_SECONDS + vae_steps * self.vae_step + steps * self.unet_step + self.evaluation
                + self.reader)


def measure_text_speed(config, count: int) -> TextSpeed:
    """Time a few training steps of stand-ins of the VAE and UNet the run will train (same preset, batch
    and sizes), one sampling pass, and the attribute reader's step when it is not cached: seconds."""
    import math

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from difflab.data.shapes import NATIVE_SIZE
    from difflab.metrics import attributes
    from difflab.models.text_presets import text_preset
    from difflab.workload import seconds_per_training_step

    preset = text_preset(config.model.preset)
    size = config.data.image_size or NATIVE_SIZE
    side, tokens = size // preset.vae_factor, 32
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL.from_config(preset.vae_config(size))
        unet = UNet2DConditionModel.from_config(preset.unet_config(side, preset.latent_channels))

        def batch(n: int, channels: int, side: int) -> tuple:
            return (torch.randn(n, channels, side, side), torch.randint(0, 1000, (n,)),
                    torch.randn(n, tokens, preset.text_width))

        images = torch.randn(config.vae.batch_size, 3, size, size)
        vae_step = seconds_per_training_step(vae, lambda: vae(images).sample.square().mean())
        x, t, text = batch(config.optim.batch_size, preset.latent_channels, side)
        unet_step = seconds_per_training_step(unet, lambda: unet(x, t, text).sample.square().mean())
        x, t, text = batch(2 * 64, preset.latent_channels, side)  # the evaluation's batch, with its CFG twin
        with torch.no_grad():
            unet(x, t, text)
            started = time.perf_counter()
            unet(x, t, text)
            sampling_pass = time.perf_counter() - started
        reader = 0.0
        if not attributes.attributes_cached(size):
            net, shots = attributes.AttributeNet(), torch.randn(attributes.BATCH_SIZE, 3, size, size)
            reader = attributes.STEPS * READER_FACTOR * seconds_per_training_step(
                net, lambda: sum(o.square().mean() for o in net(shots).values()))
    passes = (math.ceil(count / 64) + 1) * config.run.sample_steps  # the evaluation's batches and the grid
    return TextSpeed(vae_step=vae_step, unet_step=TRAINER_STEP_FACTOR * unet_step,
                     evaluation=EVAL_FACTOR * passes * sampling_pass, reader=reader)


def plan_text_run(config, count: int, *, chosen: bool, log) -> TextSpeed:
    """Say how long the run will take here. Unless the user chose the steps (`chosen`): on a machine
    where the full plan takes over PROMISED_MINUTES, train the quick model instead, and where that takes
    over TOO_SLOW_MINUTES, say so and cut its steps (VAE and UNet alike) to fit."""
    import copy

    speed = measure_text_speed(config, count)
    seconds = speed.seconds(config.vae.steps, config.run.steps)
    if not chosen and seconds > PROMISED_MINUTES * 60 and config.model.preset != QUICK_PLAN["preset"]:
        full = seconds
        quick = copy.deepcopy(config)
        use_plan(quick, QUICK_PLAN)
        speed = measure_text_speed(quick, count)
        use_plan(config, QUICK_PLAN)
        seconds = speed.seconds(config.vae.steps, config.run.steps)
        log.info("the full text quickstart would take about %s on this machine (measured); training the quick "
                 "model instead (a smaller UNet and VAE: lower prompt adherence, docs/benchmarks.md)", minutes(full))
    reader = " and training the attribute reader once" if speed.reader else ""
    vae_steps, steps = config.vae.steps, config.run.steps
    if chosen or seconds <= TOO_SLOW_MINUTES * 60:
        log.info("measured on this machine: a VAE step %.2f s, a UNet step %.2f s; the VAE (%s steps), the UNet "
                 "(%s steps), the evaluation (%d images)%s should take about %s", speed.vae_step, speed.unet_step,
                 f"{vae_steps:,}", f"{steps:,}", count, reader, minutes(seconds))
        return speed
    fixed = speed.seconds(0, 0)
    share = max(LEAST_SHARE, (TOO_SLOW_MINUTES * 60 - fixed) / (seconds - fixed))
    config.vae.steps, config.run.steps = max(1, round(vae_steps * share)), max(1, round(steps * share))
    log.warning("this machine is too slow for the text quickstart: measured here (a VAE step %.2f s, a UNet step "
                "%.2f s), even its quick model would take about %s, more than %d. Training %d%% of its steps "
                "instead (the VAE %s, the UNet %s): about %s. Expect lower prompt adherence and blurrier shapes "
                "(docs/benchmarks.md); for the full result give --steps %d, or run it on a faster or less busy "
                "machine.", speed.vae_step, speed.unet_step, minutes(seconds), TOO_SLOW_MINUTES,
                round(100 * share), f"{config.vae.steps:,}", f"{config.run.steps:,}",
                minutes(speed.seconds(config.vae.steps, config.run.steps)), FULL_PLAN["steps"])
    return speed


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} minutes" if seconds >= 60 else f"{seconds:.0f} seconds"


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
