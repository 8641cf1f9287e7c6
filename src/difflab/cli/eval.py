"""difflab eval: measure a model against held-out real images."""

from __future__ import annotations

from pathlib import Path

from difflab.cli.options import add_cfg_options, add_device
from difflab.data import DATA_SPEC_HELP
from difflab.diffusion.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from difflab.models.model import DEFAULT_CFG_SCALE, DEFAULT_TEXT_CFG_SCALE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="Fréchet distance and class accuracy of a model's samples against held-out real images",
        description="Generate -n images and compare them with the held-out ('test') split of the data: the "
                    "Fréchet distance in the feature space of a classifier difflab trains on the real labelled "
                    "data (cached), the real-data floor of that distance (n real training images against the "
                    "same held-out images), and, for class-conditional models, the classifier's accuracy on "
                    "samples generated for each class. Text-to-image models trained on the built-in shapes data are "
                    "measured on prompt adherence instead: the share of images whose colour, shape and position "
                    "(read by an attribute reader difflab trains) match their prompts, for attribute combinations "
                    "seen in training and held out of it; the figures are also written into a local model folder's "
                    "card. "
                    "Text models trained on labelled data with a caption template are asked for each class by its "
                    "caption and measured like class-conditional ones; text models trained on other captioned data "
                    "(a folder of your own) are asked for the held-out images' captions and measured against those "
                    "images (the Fréchet distance in a CLIP model's image embeddings, --features clip:PATH or "
                    "--clip-model PATH, on unlabelled data; with --clip-model also the CLIP score, beside the real "
                    "images' own). Prints a line of text, and JSON on standard output.",
    )
    p.add_argument("--model", required=True, help="model folder, run folder or Hub id")
    p.add_argument("--data", help=f"{DATA_SPEC_HELP} (default: the data the model was trained on)")
    p.add_argument("-n", "--count", type=int, default=1000, help="images to generate (default 1000)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER,
                   help=f"one of {', '.join(SAMPLERS)} (default {DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampler steps (default {DEFAULT_STEPS})")
    p.add_argument("--cfg-scale", type=float,
                   help=f"classifier-free guidance (default {DEFAULT_CFG_SCALE} for class-conditional models, "
                        f"{DEFAULT_TEXT_CFG_SCALE} for text models)")
    add_cfg_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    p.add_argument("--features",
                   help="feature space of the Fréchet distance: classifier (a classifier difflab trains on labelled "
                        "data; the default), clip:PATH_OR_ID for a CLIP model's image embeddings (the default on "
                        "unlabelled data when --clip-model is given), or attributes (shapes text models' default)")
    p.add_argument("--clip-model", metavar="PATH_OR_ID",
                   help="text models: also the CLIP score of the images against their prompts, with this CLIP model "
                        "(a transformers CLIPModel folder with its tokenizer, or a Hub id while online)")
    p.add_argument("--batch-size", type=int, default=250, help="images per forward pass (default 250)")
    add_device(p)
    p.add_argument("--json", type=Path, help="also write the JSON to this file")
    p.add_argument("--no-record", dest="record", action="store_false",
                   help="leave the model folder's card as it is (by default a text model's measured adherence is "
                        "written into it)")
    p.add_argument("--yes", action="store_true", help="start even when the estimate says it would take hours")
    p.set_defaults(run=run)


def run(args) -> int:
    import json
    import logging

    from difflab.cli.checks import check_flags, check_with_model
    from difflab.devices import pick_device
    from difflab.errors import ConfigError
    from difflab.files import write_text_atomic
    from difflab.metrics.evaluate import Evaluator, held_out_captions, summary_line
    from difflab.metrics.prompt_adherence import is_shapes
    from difflab.models.schedules import check_choice
    from difflab.storage.folder import load_model

    check_choice("sampler", args.sampler, SAMPLERS)
    if args.count < 2 or args.steps < 1 or args.batch_size < 1:
        raise ConfigError("-n must be at least 2, and --steps and --batch-size at least 1")
    check_flags(args)  # numbers and the --json path, before minutes of work
    model = load_model(args.model, device=pick_device(args.device))
    check_with_model(args, model, per_class=False)
    clip = None
    if args.clip_model:
        from difflab.models.clip import load_clip

        if model.prompts is None:
            raise ConfigError("--clip-model scores images against their prompts; this model takes no prompts")
        clip = load_clip(args.clip_model, model.device)
    spec = args.data or model.info.data
    if spec in ("", "(unknown)"):
        raise ConfigError(f"{args.model} does not say what data it was trained on; give --data")
    template = model.info.training.caption_template
    if model.prompts is not None and is_shapes(spec) and not template:
        result = {"model": str(args.model), "data": spec, **evaluate_text_model(model, spec, args, clip)}
        if args.record:
            record_evaluation_in(args.model, result)
    else:
        check_features(args.features)
        unlabelled = f"clip:{args.clip_model}" if args.clip_model else None
        # a text model on its own captioned data is asked for the held-out images' captions
        own_captions = model.prompts is not None and not template
        evaluator = Evaluator.for_data(spec, model.info.image_size, model.info.channels, args.features, unlabelled,
                                       captioned=own_captions)
        prompts = held_out_captions(evaluator, args.count) if own_captions else None
        result = evaluator(model, args.count, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                           cfg_interval=args.cfg_interval, cfg_rescale=args.cfg_rescale, seed=args.seed,
                           batch_size=args.batch_size, progress=True,
                           caption_template=template if model.prompts is not None else None, clip=clip,
                           prompts=prompts)
        result = {"model": str(args.model), "data": spec, **result, "frechet_floor": evaluator.floor(args.count)}
        if model.latent:
            result["vae_ceiling"] = evaluator.vae_ceiling(model, args.count)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        write_text_atomic(args.json, text + "\n")
    logging.getLogger("difflab").info("%s", summary_line(result))
    return 0


def check_features(features: str | None) -> None:
    if features == "attributes":
        from difflab.errors import ConfigError

        raise ConfigError("--features attributes is the attribute reader of text models trained on shapes; use "
                          "classifier or clip:PATH_OR_ID here")


def record_evaluation_in(spec: str, result: dict) -> None:
    """A local model folder keeps its measured prompt adherence (difflab.json, the card's table)."""
    from pathlib import Path

    from difflab.layout import local_model_folder
    from difflab.metrics.prompt_adherence import record_evaluation

    if Path(spec).expanduser().is_dir():
        record_evaluation(local_model_folder(spec), result)


def evaluate_text_model(model, spec: str, args, clip=None) -> dict:
    from difflab.errors import ConfigError
    from difflab.metrics.prompt_adherence import adherence_line, evaluate_prompts, is_shapes, shares_text

    if not is_shapes(spec):
        raise ConfigError(f"prompt adherence is measured on the built-in shapes data, and this text model was trained "
                          f"on {spec}; give --data shapes for a shapes model")
    features = None
    if args.features and args.features != "attributes":
        from difflab.metrics.evaluate import Evaluator

        features = Evaluator.extractor_for(args.features)
        if features is None:
            raise ConfigError(f"--features {args.features}: a text model trained on shapes is measured in the "
                              "attribute reader's features (attributes, the default) or a CLIP model's (clip:PATH)")
    result = evaluate_prompts(model, args.count, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                              cfg_interval=args.cfg_interval, cfg_rescale=args.cfg_rescale, seed=args.seed,
                              batch_size=args.batch_size, progress=True, clip=clip, features=features)
    import logging

    log = logging.getLogger("difflab")
    log.info("prompt adherence: %s", adherence_line(result))
    if "vae_ceiling" in result:
        log.info("the VAE's reconstructions of real images read as: %s (the model cannot do better)",
                 shares_text(result["vae_ceiling"]))
    return result
