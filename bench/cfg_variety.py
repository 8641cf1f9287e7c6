"""Guidance that keeps variety: plain classifier-free guidance against guidance in a limited interval of
noise levels and guidance rescale, on a text model trained on the built-in `shapes`.

For each setting (SCALE[:LOW-HIGH][:RESCALE], e.g. 7.5, 7.5:0.5-5, 7.5::0.7) it measures what
`difflab eval` measures (prompt adherence on seen and held-out colour–shape pairs, Fréchet distance in
the attribute reader's feature space and its real-data floor at the same n) and a within-prompt
diversity: the mean pairwise distance, in the reader's features, between the images of `--seeds`
seeds of one prompt, averaged over the grid prompts (the same figure for drawn images of one caption
is printed as `diversity_real`). It writes one grid per setting (rows: prompts, the last two held out).

    python bench/cfg_variety.py --model runs/shapes-t2i -n 500 --grids docs/images
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from common import GRID_PROMPTS, emit, machine
from difflab.data import shapes
from difflab.diffusion.cfg import ClassifierFreeGuidance, noise_levels, parse_interval
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.diffusion.samplers import scheduler_for
from difflab.images import make_grid, save_png
from difflab.metrics.attributes import load_or_train_attributes
from difflab.metrics.prompt_adherence import evaluate_prompts
from difflab.storage.folder import load_model

SETTINGS = ("1.5", "3", "5", "7.5", "7.5:0.3-5", "7.5:0.1-2", "7.5::0.7", "7.5:0.3-5:0.7")


def parse_setting(text: str) -> ClassifierFreeGuidance:
    scale, interval, rescale = (text.split(":") + ["", ""])[:3]
    return ClassifierFreeGuidance(float(scale), parse_interval(interval) if interval else (0.0, float("inf")),
                                  float(rescale) if rescale else 0.0)


def label(cfg: ClassifierFreeGuidance) -> str:
    parts = [f"CFG {cfg.scale:g}"]
    if "cfg_interval" in cfg.settings():
        parts.append(f"interval {cfg.settings()['cfg_interval']}")
    if cfg.rescale:
        parts.append(f"rescale {cfg.rescale:g}")
    return ", ".join(parts)


def file_name(cfg: ClassifierFreeGuidance) -> str:
    name = f"cfg_variety_{cfg.scale:g}"
    if "cfg_interval" in cfg.settings():
        name += f"_i{cfg.settings()['cfg_interval']}"
    if cfg.rescale:
        name += f"_r{cfg.rescale:g}"
    return name + ".png"


def mean_pairwise(features: torch.Tensor) -> float:
    """Mean distance between every two of the rows of `features`."""
    distances = torch.cdist(features, features)
    count = len(features)
    return float(distances.sum() / (count * (count - 1)))


def diversity(reader, images: torch.Tensor, seeds: int) -> float:
    """Within-prompt diversity of images laid out prompt by prompt, `seeds` each (in [-1, 1])."""
    features = reader.features(images).double()
    return sum(mean_pairwise(group) for group in features.split(seeds)) / (len(features) // seeds)


def real_diversity(reader, size: int, seeds: int) -> float:
    """The same figure for drawn images: `seeds` drawings of each grid prompt's scene (what the data
    itself varies within one caption: the jitter of centre and size)."""
    import numpy as np

    groups = []
    for caption in GRID_PROMPTS:
        scene = shapes.parse_caption(caption)
        drawn = [torch.from_numpy(shapes.render(scene, size, np.random.default_rng(k))) for k in range(seeds)]
        groups.append(torch.stack(drawn).permute(0, 3, 1, 2).float().div(127.5).sub(1.0))
    return diversity(reader, torch.cat(groups), seeds)


def step_sigmas(model, sampler: str, steps: int) -> list[float]:
    scheduler = scheduler_for(sampler, model.sampler_config)
    scheduler.set_timesteps(steps)
    sigma = noise_levels(model.noise_schedule)
    return [round(sigma(t), 3) for t in scheduler.timesteps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a text model trained on shapes")
    parser.add_argument("-n", type=int, default=500, help="prompts per evaluation (half seen, half held out)")
    parser.add_argument("--settings", nargs="+", default=SETTINGS, help="SCALE[:LOW-HIGH][:RESCALE] each")
    parser.add_argument("--seeds", type=int, default=6, help="seeds per grid prompt (diversity, grids)")
    parser.add_argument("--sampler", default="dpm++2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--grids", type=Path, help="folder for a grid per setting")
    args = parser.parse_args()
    model = load_model(args.model)
    model.freeze()
    reader = load_or_train_attributes(model.info.image_size)
    result = {"machine": machine(), "model": args.model, "n": args.n, "sampler": args.sampler, "steps": args.steps,
              "step_sigmas": step_sigmas(model, args.sampler, args.steps), "rows": []}
    result["diversity_real"] = round(real_diversity(reader, model.info.image_size, args.seeds), 3)
    prompts = [p for p in GRID_PROMPTS for _ in range(args.seeds)]
    for text in args.settings:
        cfg = parse_setting(text)
        options = {"cfg_scale": cfg.scale, "cfg_interval": cfg.interval, "cfg_rescale": cfg.rescale}
        began = time.perf_counter()
        figures = evaluate_prompts(model, args.n, sampler=args.sampler, steps=args.steps, reader=reader, **options)
        images = generate(model, GenerationRequest(len(prompts), prompts=prompts, sampler=args.sampler,
                                                   steps=args.steps, seed=0, **options))
        row = {"setting": label(cfg), "seen_shape": figures["adherence"]["seen"]["shape"],
               "held_out_shape": figures["adherence"]["held_out"]["shape"],
               "seen_all": figures["adherence"]["seen"]["all"], "held_out_all": figures["adherence"]["held_out"]["all"],
               "frechet_distance": figures["frechet_distance"], "frechet_floor": figures["frechet_floor"],
               "diversity": round(diversity(reader, images * 2 - 1, args.seeds), 3),
               "seconds": round(time.perf_counter() - began, 1)}
        if args.grids:
            args.grids.mkdir(parents=True, exist_ok=True)
            path = args.grids / file_name(cfg)
            save_png(make_grid(images, args.seeds), path, {"model": args.model, **cfg.settings(include_scale=True)})
            row["grid"] = str(path)
        result["rows"].append(row)
        print(row, file=sys.stderr, flush=True)
    emit(result)


if __name__ == "__main__":
    main()
