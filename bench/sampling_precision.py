"""Sampling in bf16 against fp32 on the CPU: speed, and whether the images change (Fréchet distance
within the noise of the measurement).

bf16 here is `torch.autocast("cpu", dtype=torch.bfloat16)` around difflab's sampling loop (the UNet runs
in bf16, the sampler's arithmetic stays fp32). Speed: seconds for one batch, fp32 and bf16 runs
alternating, medians. Quality: n images at seed S in each precision, and n more at another seed in
each, all measured by the same evaluator (`difflab eval`'s classifier features); the yardstick of
"within noise" is how far the distance moves between the two seeds in the same precision.

    python bench/sampling_precision.py --model runs/NAME [-n 500] [--sampler dpm++2m] [--steps 20]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from common import emit, median
from difflab.devices import auto_precision, cpu_flags
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.diffusion.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS
from difflab.metrics.evaluate import Evaluator
from difflab.metrics.frechet import frechet_distance
from difflab.models.model import DEFAULT_CFG_SCALE
from difflab.storage.folder import load_model

PRECISIONS = ("fp32", "bf16")


def precision(name: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else nullcontext()


def labels_for(model, n: int) -> torch.Tensor | None:
    return torch.arange(n) % len(model.class_names) if model.class_names else None


def sample(model, n: int, seed: int, name: str, args) -> torch.Tensor:
    with precision(name):
        return generate(model, GenerationRequest(n, sampler=args.sampler, steps=args.steps, seed=seed,
                                                 class_labels=labels_for(model, n), cfg_scale=args.cfg_scale),
                        batch_size=args.batch_size)


def measure(evaluator: Evaluator, model, images: torch.Tensor) -> dict:
    features, predictions = evaluator.classifier.features_and_predictions(images * 2 - 1)
    row = {"frechet_distance": round(frechet_distance(features.numpy(), evaluator.test_features().numpy()), 4)}
    labels = labels_for(model, len(images))
    if labels is not None:
        row["class_accuracy"] = round((predictions == labels).float().mean().item(), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", help="data to measure against (default: the model's)")
    parser.add_argument("-n", "--count", type=int, default=500)
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--cfg-scale", type=float, default=DEFAULT_CFG_SCALE)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs=2, default=(0, 100_000))
    parser.add_argument("--timing-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = load_model(args.model)
    model.denoiser.eval()

    times = {name: [] for name in PRECISIONS}
    for name in PRECISIONS:  # warm up
        sample(model, args.timing_batch, 0, name, args)
    for _ in range(args.repeats):
        for name in PRECISIONS:
            start = time.perf_counter()
            sample(model, args.timing_batch, 0, name, args)
            times[name].append(time.perf_counter() - start)
    seconds = {name: median(values) for name, values in times.items()}

    info = model.info
    evaluator = Evaluator.for_data(args.data or info.data, info.image_size, info.channels)
    images = {(name, seed): sample(model, args.count, seed, name, args) for seed in args.seeds for name in PRECISIONS}
    quality = {f"{name}, seed {seed}": measure(evaluator, model, x) for (name, seed), x in images.items()}
    first = args.seeds[0]
    pixels = (images[("bf16", first)] - images[("fp32", first)]).abs()
    distances = {key: row["frechet_distance"] for key, row in quality.items()}
    fd = {(name, seed): distances[f"{name}, seed {seed}"] for name, seed in images}
    emit({
        "benchmark": "sampling_precision",
        "setup": {"model": args.model, "image_size": info.image_size, "channels": info.channels,
                  "classes": len(model.class_names or []), "sampler": args.sampler, "steps": args.steps,
                  "cfg_scale": args.cfg_scale, "n": args.count, "seeds": list(args.seeds),
                  "timing_batch": args.timing_batch, "repeats": args.repeats},
        "cpu_bf16_flags": sorted((cpu_flags() or set()) & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "auto_precision": auto_precision("cpu"),
        "seconds_per_batch": {name: round(value, 3) for name, value in seconds.items()},
        "bf16_speedup": round(seconds["fp32"] / seconds["bf16"], 3),
        "quality": quality,
        "frechet_floor": round(evaluator.floor(args.count), 4),
        # the yardstick: how far the distance moves with the seed alone, in each precision
        "seed_noise": {name: round(abs(fd[(name, args.seeds[0])] - fd[(name, args.seeds[1])]), 4)
                       for name in PRECISIONS},
        "precision_change": {f"seed {seed}": round(abs(fd[("bf16", seed)] - fd[("fp32", seed)]), 4)
                             for seed in args.seeds},
        "pixels_bf16_vs_fp32_same_seed": {"mean_abs": round(pixels.mean().item(), 4),
                                          "max_abs": round(pixels.max().item(), 4)},
        "runs": {name: [round(v, 3) for v in values] for name, values in times.items()},
    })


if __name__ == "__main__":
    main()
