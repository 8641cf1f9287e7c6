"""difflab sample: generate images from a model folder."""

from __future__ import annotations

from pathlib import Path

from difflab.cli.options import add_model_loading
from difflab.diffusion.samplers import DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS

GUIDANCE_MODES = ("fast", "full")  # the same as difflab.diffusion.guidance's, without importing torch here


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="generate images from a trained model",
        description="Generate images from a difflab model folder, a run folder, any diffusers "
                    "DDPMPipeline/DDIMPipeline folder, or a Hub id. Image i uses seed SEED+i.",
    )
    p.add_argument("--model", required=True, help="model folder, run folder or Hub id")
    p.add_argument("-n", "--count", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER,
                   help=f"one of {', '.join(SAMPLERS)} (default {DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampler steps (default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    p.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic (default), 1 like DDPM")
    p.add_argument("--class", dest="classes", metavar="CLASS",
                   help="class-conditional models: a class name or index, a comma-separated list, or 'all' "
                        "for one row per class with -n images each (default: all)")
    p.add_argument("--cfg-scale", type=float, default=DEFAULT_CFG_SCALE,
                   help=f"classifier-free guidance: 1 plain conditional, 0 unconditional (default {DEFAULT_CFG_SCALE})")
    p.add_argument("--guide", action="append", default=[], metavar="TERM=VALUE[:SCALE]",
                   help="steer sampling with a loss on the predicted image (repeatable): color=#55FFAA:40, "
                        "clip=\"a red rose\":8, image=ref.png:8, classifier=CLASS:2; add @START-END for a window "
                        "of the steps (fractions) and /K to act every K steps (see docs/guidance.md)")
    p.add_argument("--guidance-mode", choices=GUIDANCE_MODES, default="fast",
                   help="fast: gradient through the predicted image only; full: through the network too "
                        "(slower, more memory) (default fast)")
    p.add_argument("--clip-model", metavar="PATH_OR_ID",
                   help="CLIP model for clip= and image= guidance: a local transformers CLIPModel folder, "
                        "or a Hub id while online (openai/clip-vit-base-patch32)")
    p.add_argument("--classifier-data", metavar="SPEC",
                   help="labelled data to train the classifier= guidance classifier on (default: the model's "
                        "training data; the classifier is the one difflab eval trains, cached)")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="grid image to write (default samples.png)")
    p.add_argument("--out-dir", type=Path, help="also write each image as its own PNG here")
    p.add_argument("--columns", type=int, help="images per grid row (default: a square grid)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--yes", action="store_true", help="start even when the estimate says it would take hours")
    add_model_loading(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import logging

    import torch

    from difflab.cli.checks import check_flags, check_with_model
    from difflab.devices import pick_device
    from difflab.diffusion.generate import generate
    from difflab.diffusion.schedules import check_choice
    from difflab.errors import ConfigError
    from difflab.images import make_grid, save_png, to_pil
    from difflab.pipelines.folder import load_model

    log = logging.getLogger("difflab")
    check_choice("sampler", args.sampler, SAMPLERS)
    for name in ("count", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.eta is not None and args.eta < 0:
        raise ConfigError("--eta must be 0 or more")
    if args.cfg_scale < 0:
        raise ConfigError(f"--cfg-scale must be 0 or more (got {args.cfg_scale}); 1 is plain conditional sampling")
    check_flags(args)  # numbers, columns and output paths, before any work
    model = load_model(args.model, allow_pickle=args.allow_pickle, device=pick_device(args.device))
    check_with_model(args, model)  # steps the schedule can take, a workload the machine can do
    guidance = guidance_terms(args, model)
    settings = {"model": str(args.model), "sampler": args.sampler, "steps": args.steps, "seed": args.seed}
    if args.eta is not None:
        settings["eta"] = args.eta
    labels = columns = names = None
    if model.class_names or args.classes is not None:
        classes = model.class_indices(args.classes or "all")
        labels = torch.tensor(classes).repeat_interleave(args.count)  # one row per class
        columns, names = args.count, [model.class_names[c] for c in classes]
        settings["cfg_scale"] = args.cfg_scale
    if guidance:
        settings.update(guide=args.guide, guidance_mode=args.guidance_mode)
        if args.clip_model:
            settings["clip_model"] = args.clip_model
    images = generate(model, len(labels) if labels is not None else args.count, sampler=args.sampler,
                      steps=args.steps, seed=args.seed, eta=args.eta, class_labels=labels, cfg_scale=args.cfg_scale,
                      guidance=guidance, guidance_mode=args.guidance_mode, batch_size=args.batch_size, progress=True)
    save_png(make_grid(images, columns or args.columns, names), args.out, {**settings, "count": len(images)})
    log.info("wrote %d images to %s", len(images), args.out)
    if args.out_dir:
        for i, image in enumerate(images):
            each = {**settings, "seed": args.seed + i}
            if labels is not None:
                each["class"] = model.class_names[int(labels[i])]
            save_png(to_pil(image), args.out_dir / f"{args.seed + i:06d}.png", each)
        log.info("and one PNG each in %s", args.out_dir)
    return 0


def guidance_terms(args, model) -> list:
    """The --guide terms, loading CLIP only if a term needs it and the classifier only when asked for."""
    from difflab.diffusion.guidance import load_clip, parse_guide

    if not args.guide:
        return []
    needs_clip = any(spec.strip().lower().startswith(("clip=", "image=")) for spec in args.guide)
    clip = load_clip(args.clip_model, device=model.device) if needs_clip and args.clip_model else None

    def classifier():
        from difflab.data import open_dataset
        from difflab.errors import GuidanceError
        from difflab.metrics.classifier import load_or_train

        spec = args.classifier_data or model.info.data
        if not spec:
            raise GuidanceError("classifier guidance needs labelled data to train its classifier on; "
                                "give --classifier-data SPEC")
        info = model.info
        train = open_dataset(spec, info.image_size, info.channels, split="train")
        test = open_dataset(spec, info.image_size, info.channels, split="test")
        if not (train.has_labels and test.has_labels):
            raise GuidanceError(f"{spec} has no labels to train the guidance classifier on; give labelled "
                                "--classifier-data")
        trained = load_or_train(spec, train, test)
        trained.network.to(model.device)
        return trained

    return [parse_guide(spec, clip=clip, classifier=classifier) for spec in args.guide]
