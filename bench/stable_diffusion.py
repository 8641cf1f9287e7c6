"""Stable Diffusion through difflab's one sampler: its cost against diffusers' pipelines, on random
components of Stable Diffusion's shape scaled to run on a CPU (UNet block channels 64/128/256/256 with
cross-attention at the first three levels, 32×32 latents, an 8× VAE, a 4-layer CLIP text encoder).

    python bench/stable_diffusion.py sampling   # difflab vs StableDiffusionPipeline.__call__: time, peak memory
    python bench/stable_diffusion.py guidance   # colour guidance on decoded latents: fast and full vs none
    python bench/stable_diffusion.py img2img    # img2img time against strength

Runs alternate and medians are reported; peak memory is the largest growth of the memory the process
has allocated (glibc's mallinfo2) during one call, in fresh processes per side (median of three).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import alternate, emit, median
from difflab.memory import peak_growth

PROMPT = "a small red circle at the top left on a white background"


def components(folder: Path) -> Path:
    """A random StableDiffusionPipeline folder of Stable Diffusion's shape, scaled down."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=256, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 64, 128, 128], down_block_types=["DownEncoderBlock2D"] * 4,
                                  up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, sample_size=256)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                                        num_hidden_layers=4, vocab_size=1000, max_position_embeddings=77))
    vocabulary = folder / "vocabulary"
    vocabulary.mkdir(parents=True)
    words = sorted(set(PROMPT.split()) | {"a", "photo", "of"})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w + "</w>": i + 2 for i, w in enumerate(words)}}
    (vocabulary / "vocab.json").write_text(json.dumps(vocab))
    (vocabulary / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(vocabulary / "vocab.json"), str(vocabulary / "merges.txt"), model_max_length=77)
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def runners(folder: Path, args):
    """name -> a function that makes one batch of images."""
    import diffusers

    from difflab.diffusion.generate import generate
    from difflab.diffusion.request import GenerationRequest
    from difflab.diffusion.samplers import scheduler_for
    from difflab.storage.folder import load_model

    model = load_model(folder)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = scheduler_for("dpm++2m", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = [PROMPT] * args.batch

    def generators():
        return [torch.Generator().manual_seed(i) for i in range(args.batch)]

    return {
        "difflab": lambda: generate(model, GenerationRequest(args.batch, sampler="dpm++2m", steps=args.steps,
                                                             prompts=PROMPT)),
        "diffusers": lambda: pipe(prompts, num_inference_steps=args.steps, guidance_scale=7.5, generator=generators(),
                                  output_type="np"),
    }, model


def sampling(folder: Path, args) -> dict:
    runs, _ = runners(folder, args)
    memory = {side: [] for side in runs}
    for _ in range(args.memory_repeats):
        for side in runs:  # each side in its own process, so one's freed memory does not hide the other's
            out = subprocess.run([sys.executable, __file__, "memory", "--side", side, "--folder", str(folder),
                                  "--batch", str(args.batch), "--steps", str(args.memory_steps)],
                                 capture_output=True, text=True, check=True)
            memory[side].append(int(out.stdout.strip().splitlines()[-1]))
    seconds, times = alternate(runs, args.repeats) if args.repeats else ({k: float("nan") for k in runs}, {})
    return {
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "time_ratio_difflab_vs_diffusers": round(seconds["difflab"] / seconds["diffusers"], 4),
        "peak_memory_growth_mb": {k: round(median(v) / 2**20, 1) for k, v in memory.items()},
        "peak_memory_runs_mb": {k: [round(x / 2**20, 1) for x in v] for k, v in memory.items()},
        "targets": {"time_ratio": "<= 1.03", "peak_memory": "difflab <= diffusers"},
        "runs": {k: [round(v, 3) for v in values] for k, values in times.items()},
    }


def guidance(folder: Path, args) -> dict:
    from difflab.diffusion.generate import generate
    from difflab.diffusion.guidance import color_guidance
    from difflab.diffusion.request import GenerationRequest
    from difflab.storage.folder import load_model

    model = load_model(folder)
    term = [color_guidance((1.0, 0.0, 0.0), 40)]
    runs = {
        "unguided": lambda: generate(model, GenerationRequest(args.batch, steps=args.steps, prompts=PROMPT)),
        "fast": lambda: generate(model, GenerationRequest(args.batch, steps=args.steps, prompts=PROMPT, guidance=term)),
        "full": lambda: generate(model, GenerationRequest(args.batch, steps=args.steps, prompts=PROMPT, guidance=term,
                                                          guidance_mode="full")),
    }
    seconds, _ = alternate(runs, args.repeats)
    return {"seconds": {k: round(v, 3) for k, v in seconds.items()},
            "cost_vs_unguided": {k: round(v / seconds["unguided"], 3) for k, v in seconds.items()}}


def img2img(folder: Path, args) -> dict:
    import numpy as np
    from PIL import Image

    from difflab.diffusion.generate import generate
    from difflab.diffusion.request import GenerationRequest
    from difflab.storage.folder import load_model

    model = load_model(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    strengths = (0.25, 0.5, 0.75, 1.0)
    runs = {s: (lambda s=s: generate(model, GenerationRequest(args.batch, steps=args.steps, prompts=PROMPT,
                                                              image=image, strength=s)))
            for s in strengths}
    seconds, _ = alternate(runs, args.repeats)
    return {"seconds_by_strength": {str(s): round(v, 3) for s, v in seconds.items()},
            "relative_to_strength_1": {str(s): round(v / seconds[1.0], 3) for s, v in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("sampling", "guidance", "img2img", "memory"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per side for peak memory")
    parser.add_argument("--memory-steps", type=int, default=4, help="sampler steps of a memory run (the peak "
                                                                     "comes from one step and the decoder)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "memory":  # a child process of `sampling`
        runs, _ = runners(args.folder, args)
        runs[args.side]()
        print(peak_growth(runs[args.side]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = components(Path(tmp))
        result = {"sampling": sampling, "guidance": guidance, "img2img": img2img}[args.part](folder, args)
    emit({"benchmark": f"stable_diffusion_{args.part}",
          "setup": {"batch": args.batch, "steps": args.steps, "repeats": args.repeats, "sampler": "dpm++2m",
                    "latents": "4×32×32", "cfg_scale": 7.5, "unet_channels": [64, 128, 256, 256]},
          **result})


if __name__ == "__main__":
    main()
