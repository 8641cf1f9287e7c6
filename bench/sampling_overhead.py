"""Sampling time of difflab's loop against the UNet in a bare loop and against diffusers' DDIMPipeline.

Same model, DDIM scheduler, steps and batch. Runs alternate; medians are reported.

    python bench/sampling_overhead.py [--preset small] [--image-size 32] [--channels 3] [--batch 32] [--steps 50]
"""

from __future__ import annotations

import argparse

import torch

from common import alternate, emit
from difflab.config import ModelConfig
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.diffusion.samplers import scheduler_for
from difflab.models.build import build_model
from difflab.models.schedules import noise_scheduler


@torch.no_grad()
def bare_loop(model, args) -> None:
    scheduler = scheduler_for("ddim", model.noise_schedule.config)
    scheduler.set_timesteps(args.steps)
    shape = (args.batch, args.channels, args.image_size, args.image_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        x = scheduler.step(model.unet(x, t).sample, t, x).prev_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from diffusers import DDIMPipeline

    model = build_model(ModelConfig(preset=args.preset), args.image_size, args.channels, "none", seed=0)
    model.denoiser.eval()
    pipe = DDIMPipeline(unet=model.unet, scheduler=scheduler_for("ddim", noise_scheduler("cosine").config))
    pipe.set_progress_bar_config(disable=True)
    runs = {
        "bare_loop": lambda: bare_loop(model, args),
        "difflab": lambda: generate(model, GenerationRequest(args.batch, sampler="ddim", steps=args.steps),
                                    batch_size=args.batch),
        "diffusers_ddim_pipeline": lambda: pipe(batch_size=args.batch, num_inference_steps=args.steps,
                                               generator=torch.Generator().manual_seed(0), output_type="np"),
    }
    seconds, times = alternate(runs, args.repeats)
    emit({
        "benchmark": "sampling_overhead",
        "setup": {k: getattr(args, k) for k in ("preset", "image_size", "channels", "batch", "steps", "repeats")},
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "difflab_overhead_vs_bare_loop": round(seconds["difflab"] / seconds["bare_loop"] - 1, 4),
        "difflab_vs_diffusers": round(seconds["difflab"] / seconds["diffusers_ddim_pipeline"], 4),
        "targets": {"overhead_vs_bare_loop": "<= 0.03", "difflab_vs_diffusers": "<= 1.0"},
        "runs": {name: [round(v, 3) for v in values] for name, values in times.items()},
    })


if __name__ == "__main__":
    main()
