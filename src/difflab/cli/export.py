"""difflab export: a trained text-to-image model or LoRA as one file that A1111 and ComfyUI load."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a text-to-image model or a LoRA as one .safetensors file for A1111 or ComfyUI",
        description="Write a difflab text-to-image model (a run folder or a Stable Diffusion model folder) in the "
                    "original Stable Diffusion single-file layout, or a LoRA run in the kohya format, so that "
                    "A1111, ComfyUI and diffusers' from_single_file / load_lora_weights load it. difflab sample "
                    "--model OUT.safetensors loads an exported model back with nothing else.",
    )
    p.add_argument("--single-file", required=True, type=Path, metavar="OUT.safetensors",
                   help="the file to write (an existing one only with --overwrite)")
    p.add_argument("--model", required=True, metavar="RUN",
                   help="run folder, model folder (a StableDiffusionPipeline or inpainting folder) or LoRA folder")
    p.add_argument("--half", action="store_true",
                   help="write float16 weights: half the size, as most shared Stable Diffusion files are "
                        "(default: the model's float32)")
    p.add_argument("--overwrite", action="store_true", help="replace --single-file if it exists")
    p.set_defaults(run=run)


def run(args) -> int:
    import logging

    from difflab.storage.single_file_export import export_single_file

    out, what = export_single_file(args.model, args.single_file, overwrite=args.overwrite,
                                   half=args.half)
    size = out.stat().st_size / 2**20
    logging.getLogger("difflab").info("wrote the %s in %s as %s (%.1f MiB)", what, args.model, out, size)
    print(out)
    return 0
