"""difflab sample: generate images from a model folder."""

from __future__ import annotations

from pathlib import Path

from difflab.cli.options import add_cfg_options, add_model_loading, check_at_least_one
from difflab.diffusion.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, GUIDANCE_MODES, SAMPLERS
from difflab.models.model import DEFAULT_CFG_SCALE, DEFAULT_TEXT_CFG_SCALE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="generate images from a trained model",
        description="Generate images from a difflab model folder, a run folder, a diffusers DDPMPipeline/"
                    "DDIMPipeline folder or a Stable Diffusion family folder (text-to-image, inpainting, "
                    "depth-to-image, ×4 upscaler), a Hub id, or a single-file checkpoint (model.safetensors). "
                    "Image i uses seed SEED+i. Text models: --prompt; "
                    "img2img: --image and --strength; inpainting: --image and --mask; depth-to-image: --image "
                    "with --depth or --depth-model; upscaling: --image (the low-resolution one) and --noise-level.",
    )
    p.add_argument("--model", required=True,
                   help="model folder, run folder, Hub id, or a single-file Stable Diffusion checkpoint "
                        "(model.safetensors; .ckpt only with --allow-pickle)")
    p.add_argument("--config-folder", metavar="FOLDER",
                   help="for a single-file checkpoint: a diffusers Stable Diffusion folder of the same model whose "
                        "configs and tokenizer/ are used (its weights are not needed), or a folder holding just "
                        "tokenizer/ (default: the configs the file carries, else difflab's own SD 1.x/2.x configs)")
    p.add_argument("-n", "--count", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER,
                   help=f"one of {', '.join(SAMPLERS)} (default {DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampler steps (default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    p.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic (default), 1 like DDPM")
    p.add_argument("--class", dest="classes", metavar="CLASS",
                   help="class-conditional models: a class name or index, a comma-separated list, or 'all' "
                        "for one row per class with -n images each (default: all)")
    p.add_argument("--cfg-scale", type=float,
                   help="classifier-free guidance: 1 plain conditional, 0 unconditional, higher follows the class "
                        f"or prompt more closely (default {DEFAULT_CFG_SCALE} for class models, "
                        f"{DEFAULT_TEXT_CFG_SCALE} for text models)")
    add_cfg_options(p)
    p.add_argument("--width", type=int, help="image width in pixels, for any model: a multiple of the VAE's factor (8 "
                                             "for Stable Diffusion) or, for a pixel model, of the factor its UNet's "
                                             "levels halve by (default: the input image's, or the model's size)")
    p.add_argument("--height", type=int, help="image height in pixels (as --width)")
    text = p.add_argument_group("text-to-image models (the Stable Diffusion family)")
    text.add_argument("--prompt", action="append", metavar="TEXT",
                      help="what to draw (repeatable: one grid row of -n images per prompt); A1111's syntax "
                           "weighs words: (word:1.3), (word), [word], BREAK; no length limit (docs/prompts.md)")
    text.add_argument("--prompt-file", type=Path, metavar="FILE", help="prompts, one per line (rows, like --prompt)")
    text.add_argument("--negative-prompt", metavar="TEXT", default=None,
                      help="what to steer away from (the unconditional half of classifier-free guidance)")
    text.add_argument("--blend", action="append", metavar="PROMPT:WEIGHT",
                      help="mix another prompt's embeddings into each prompt's: \"a leopard:0.5\" is half of each "
                           "(repeatable; the weights, each in (0, 1], add up to at most 1)")
    text.add_argument("--lora", action="append", metavar="RUN_OR_FILE",
                      help="apply a LoRA (repeatable, to combine several): a pytorch_lora_weights.safetensors file "
                           "(diffusers' or kohya's format), the folder or run folder that holds one, or a Hub id")
    text.add_argument("--lora-scale", type=float, nargs="+", metavar="S",
                      help="the LoRAs' weights: one for all, or one per --lora in order (default 1; 0: the base model)")
    text.add_argument("--embedding", action="append", metavar="FILE[:TOKEN]",
                      help="load a textual inversion embedding (repeatable): learned_embeds.safetensors, an A1111 "
                           ".safetensors, or the run folder of difflab textual-inversion; its token (the file's own, "
                           "or TOKEN) then works in prompts; .pt/.bin only with --allow-pickle")
    text.add_argument("--no-safety-checker", action="store_true",
                      help="do not run the safety checker of a folder that has one (it blacks out flagged images)")
    start = p.add_argument_group("starting from an image (any model)")
    start.add_argument("--image", metavar="IN.png",
                       help="img2img: start from this image, noised part-way (see --strength); with --mask, "
                            "inpainting; the upscaler's low-resolution input")
    start.add_argument("--strength", type=float,
                       help="how much of --image is repainted, in (0, 1]: 1 repaints everything (starts from "
                            "pure noise), 0.3 a little (default 0.8; inpainting 1.0)")
    start.add_argument("--mask", metavar="MASK.png",
                       help="inpainting: white where the image is repainted, black where it is kept")
    start.add_argument("--depth", metavar="DEPTH.png", help="depth-to-image models: the depth map (nearer = brighter)")
    start.add_argument("--depth-model", metavar="PATH_OR_ID",
                       help="depth-to-image models: estimate the depth map with this transformers depth model "
                            "(default: the folder's own depth estimator)")
    start.add_argument("--noise-level", type=int,
                       help="the ×4 upscaler: noise added to the low-resolution input, 0 to its maximum (default 20)")
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
    p.add_argument("--out", type=Path, default=Path("samples.png"),
                   help="grid image to write: .png, .jpg or .webp, with the settings in it (default samples.png); "
                        "never one of the inputs")
    p.add_argument("--out-dir", type=Path, help="also write each image as its own PNG here")
    p.add_argument("--columns", type=int, help="images per grid row (default: a square grid)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                   help="auto (default): bf16 where the device runs it fast (GPUs from compute capability 8.0; "
                        "CPUs with AMX or AVX-512 BF16: twice as fast, images alike within what the seed moves), "
                        "else full precision; no: always fp32. In fp16/bf16 a Stable "
                        "Diffusion model's weights are held in that type (half the memory; on a GPU its fp16 "
                        "weight files are fetched where the folder or Hub repo has them)")
    p.add_argument("--offload", action="store_true",
                   help="GPUs with little memory: keep the networks on the CPU and move each to the GPU while it "
                        "runs (model CPU offload, as diffusers' enable_model_cpu_offload); slower, a fraction of "
                        "the memory")
    p.add_argument("--yes", action="store_true",
                   help="start even when the estimate says it would take hours or not fit in memory")
    add_model_loading(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import dataclasses
    import logging

    import torch

    from difflab.cli.checks import check_flags, check_with_model, request_from_flags
    from difflab.devices import pick_device
    from difflab.diffusion.generate import generate
    from difflab.diffusion.request import check_depth_model
    from difflab.errors import ConfigError, InputError
    from difflab.images import make_grid, save_png, to_pil
    from difflab.models.offload import check_offload, offload
    from difflab.storage.folder import load_model
    from difflab.storage.lora import apply_loras, plan_loras

    log = logging.getLogger("difflab")
    check_at_least_one(args)
    check_flags(args)  # the request's numbers and names, columns and output paths, before any work
    request = request_from_flags(args)
    prompts = read_prompts(args)
    check_prompt_syntax(prompts, args.negative_prompt, args.blend)  # before the model loads
    if args.lora_scale and not args.lora:
        raise ConfigError("--lora-scale sets the weights of LoRAs: give them with --lora")
    loras = plan_loras(args.lora, args.lora_scale, allow_pickle=args.allow_pickle) if args.lora else []
    device = pick_device(args.device)
    dtype, variant = half_weights(args.precision, device)
    if args.offload:
        check_offload(device)  # before loading
    model = load_model(args.model, allow_pickle=args.allow_pickle, device="cpu" if args.offload else device,
                       safety_checker=not args.no_safety_checker, config_folder=args.config_folder, dtype=dtype,
                       variant=variant)
    if args.offload:
        offload(model, device)
    if loras:
        from difflab.models.lora import check_attention

        check_attention(model)  # a pixel model takes no LoRA: said before what it takes
    labels = columns = names = per_image_prompts = None
    if args.classes is not None and model.prompts is not None:
        raise InputError("this is a text-to-image model: it takes a prompt (--prompt), not a class (--class)")
    if prompts is not None or model.prompts is not None:
        per_image_prompts = [prompt for prompt in (prompts or []) for _ in range(args.count)] or None
        columns, names = (args.count, [short(p) for p in prompts]) if prompts and len(prompts) > 1 else (None, None)
    elif model.class_names or args.classes is not None:
        classes = model.class_indices(args.classes or "all")
        labels = torch.tensor(classes).repeat_interleave(args.count)  # one row per class
        columns, names = args.count, [model.class_names[c] for c in classes]
    count = len(labels) if labels is not None else len(per_image_prompts) if per_image_prompts else args.count
    request = dataclasses.replace(request, count=count, class_labels=labels, prompts=per_image_prompts,
                                  negative_prompt=args.negative_prompt, blend=args.blend or (),
                                  safety_check=not args.no_safety_checker)
    # Every rule against this model, before a LoRA or depth estimator is fetched and before the workload is timed
    request.check(model)
    check_depth_model(model, "--depth-model" if args.depth_model else None)
    check_with_model(args, model, prompts=len(prompts or []))  # a workload that fits
    apply_loras(model, loras)
    if args.embedding:
        from difflab.models.embeddings import load_embeddings

        tokens = load_embeddings(model, args.embedding, allow_pickle=args.allow_pickle)
        log.info("textual inversion tokens: %s", ", ".join(tokens))
    model.freeze()  # sampling only: no parameter requires a gradient
    if args.depth_model:
        from difflab.models.depth import load_depth_estimator

        model.depth_estimator = load_depth_estimator(args.depth_model, model.device)
    request = dataclasses.replace(request, guidance=guidance_terms(args, model))
    images = generate(model, request, batch_size=args.batch_size, progress=True)
    # What the request does not hold: where the model, LoRAs, embeddings and guidance terms came from
    loaded = {"model": str(args.model)}
    if args.embedding:
        loaded["embedding"] = args.embedding
    if loras:
        loaded.update(lora=args.lora, lora_scale=[scale for _, scale in loras])
    if request.guidance:
        loaded.update(guide=args.guide, guidance_mode=args.guidance_mode)
        if args.clip_model:
            loaded["clip_model"] = args.clip_model
    size = images.shape[-1], images.shape[-2]  # one image's (the grid is larger)
    grid = make_grid(images, columns or args.columns, names)
    save_png(grid, args.out, {**loaded, **request.settings(model, size=size)})
    log.info("wrote %d images to %s", len(images), args.out)
    if args.out_dir:
        for i, image in enumerate(images):
            save_png(to_pil(image), args.out_dir / f"{args.seed + i:06d}.png",
                     {**loaded, **request.settings(model, image=i, size=size)})
        log.info("and one PNG each in %s", args.out_dir)
    return 0


def half_weights(precision: str, device):
    """(dtype, variant) to load a model with for `precision`: the half type (and, on a GPU, the fp16 weight
    files) for fp16/bf16, as diffusers' pipelines sample; (None, None) for full precision."""
    import torch

    from difflab.devices import auto_precision

    if precision == "auto":
        precision = auto_precision(device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return dtype, ("fp16" if dtype is not None and device.type == "cuda" else None)


def read_prompts(args) -> list[str] | None:
    """--prompt (repeatable) and the lines of --prompt-file, in that order; None if neither is given."""
    from difflab.errors import InputError

    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            lines = args.prompt_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the prompt file {args.prompt_file} ({getattr(e, 'strerror', None) or e})"
                             ) from None
        prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise InputError(f"the prompt file {args.prompt_file} holds no prompt (one per line)")
    return prompts or None


def check_prompt_syntax(prompts: list[str] | None, negative: str | None, blends: list[str] | None) -> None:
    from difflab.models.prompt_syntax import check_blends, parse_prompt

    for prompt in [*(prompts or []), *([negative] if negative else [])]:
        parse_prompt(prompt)
    for prompt, _ in check_blends(list(blends or [])):
        parse_prompt(prompt)


def short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
