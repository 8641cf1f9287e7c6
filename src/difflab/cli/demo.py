"""difflab demo: a Gradio page for a model, or a Hugging Face Space folder to upload."""

from __future__ import annotations

from pathlib import Path

from difflab.app.service import Limits
from difflab.cli.options import add_model_loading

DEFAULT_LIMITS = Limits()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="serve a model as a Gradio web page, or export it as a Hugging Face Space",
        description="Start a Gradio page for a difflab or diffusers model. Pixel models (unconditional or "
                    "class-conditional): sampler, steps, seed, number of images, class and CFG scale, colour guidance "
                    "and, with --clip-model, CLIP guidance. Text-to-image models (the Stable Diffusion family): "
                    "prompt, negative prompt, CFG scale, width and height, and tabs for image to image, inpainting "
                    "(paint the mask in the page or upload one), depth to image and upscaling, as the model allows; "
                    "'Send to img2img' and 'Send to inpainting' under the results, and a LoRA picker for the LoRAs "
                    "given with --lora. Each image's settings are shown under it and saved in its PNG. With --export, "
                    "write a folder to upload as a Space instead (then 'difflab push --space').",
    )
    p.add_argument("--model", required=True, help="model folder, run folder or Hub id")
    p.add_argument("--lora", action="append", metavar="RUN_OR_FILE", default=[],
                   help="offer a LoRA in the page's LoRA picker (repeatable), for a text-to-image --model: a "
                        "pytorch_lora_weights.safetensors file, the folder or run folder that holds one (a LoRA "
                        "DreamBooth run), as 'difflab sample --lora' takes; each request picks one and its weight")
    p.add_argument("--clip-model", help="a CLIP model (folder or Hub id) for CLIP guidance by prompt")
    p.add_argument("--embedding", action="append", metavar="FILE[:TOKEN]",
                   help="load a textual inversion embedding (repeatable); its token is listed under the prompt")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1, this machine only; 0.0.0.0 for every network)")
    p.add_argument("--port", type=int, help="port (default: 7860, or the next free one)")
    p.add_argument("--share", action="store_true", help="also make a temporary public link through Gradio")
    p.add_argument("--export", type=Path, metavar="DIR",
                   help="write a Hugging Face Space folder (app.py, requirements.txt, README.md, the model) "
                        "to DIR instead of serving")
    limits = p.add_argument_group("limits (protect the server)")
    limits.add_argument("--max-steps", type=int, default=DEFAULT_LIMITS.max_steps,
                        help=f"sampler steps a request may ask for (default {DEFAULT_LIMITS.max_steps})")
    limits.add_argument("--max-images", type=int, default=DEFAULT_LIMITS.max_images,
                        help=f"images per request (default {DEFAULT_LIMITS.max_images})")
    limits.add_argument("--max-image-size", type=int, default=DEFAULT_LIMITS.max_image_size,
                        help="the largest image side a request may ask for, in pixels; models whose own images are "
                             f"larger are refused (default {DEFAULT_LIMITS.max_image_size})")
    limits.add_argument("--max-queue", type=int, default=DEFAULT_LIMITS.max_queue,
                        help=f"requests that may wait; more are turned away (default {DEFAULT_LIMITS.max_queue})")
    add_model_loading(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import logging

    from difflab.errors import ConfigError

    log = logging.getLogger("difflab")
    if args.port is not None and not 0 < args.port < 65536:
        raise ConfigError(f"--port must be from 1 to 65535 (got {args.port})")
    limits = Limits(max_steps=args.max_steps, max_images=args.max_images, max_image_size=args.max_image_size,
                    max_queue=args.max_queue)
    if args.export:
        from difflab.app.export import export_space
        from difflab.files import check_output_folder

        check_output_folder(args.export, "--export")  # before the model is loaded and copied

        out = export_space(args.model, args.export, clip_model=args.clip_model, limits=limits,
                           allow_pickle=args.allow_pickle, loras=args.lora, embeddings=args.embedding or ())
        log.info("wrote a Hugging Face Space to %s: upload the folder, or run it here with "
                 "'cd %s && python app.py'", out, out)
        return 0

    from difflab.app import build_demo, launch
    from difflab.app.demo import check_host

    check_host(args.host)  # before the model loads
    demo = build_demo(args.model, clip_model=args.clip_model, limits=limits, device=args.device,
                      allow_pickle=args.allow_pickle, loras=args.lora, embeddings=args.embedding or ())
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0
