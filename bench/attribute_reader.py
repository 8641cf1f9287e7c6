"""The attribute reader behind prompt adherence on `shapes`: training time and held-out accuracy.

Trains the reader exactly as `difflab eval` would (difflab.metrics.attributes, default settings, no
cache), then reports its accuracy per attribute on fresh images it never saw — clean, and with the
noise and blur generated images show — and how fast `shapes` images are drawn.

    python bench/attribute_reader.py [--image-size 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import emit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from difflab.data.shapes import draw_scenes
    from difflab.metrics import attributes

    started = time.perf_counter()
    images, _ = draw_scenes(5000, args.image_size, seed=7)
    draw_seconds = time.perf_counter() - started

    started = time.perf_counter()
    reader = attributes.train_attributes(args.image_size)
    train_seconds = time.perf_counter() - started

    test, truth = draw_scenes(2000, args.image_size, seed=attributes.SEED + 2, objects=2)
    x = test.float() / 127.5 - 1
    generator = torch.Generator().manual_seed(0)
    blurred = torch.lerp(x, torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False), 0.5)
    noisy = (blurred + 0.1 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
    keys = (*attributes.ATTRIBUTES, "all")
    clean = attributes.adherence(x, truth, reader)
    degraded = attributes.adherence(noisy, truth, reader)
    emit({
        "benchmark": "attribute_reader",
        "image_size": args.image_size,
        "shapes_images_per_second": round(len(images) / draw_seconds),
        "train_images": attributes.TRAIN_IMAGES, "steps": attributes.STEPS, "batch_size": attributes.BATCH_SIZE,
        "train_seconds": round(train_seconds, 1),
        "own_test_accuracy": reader.test_accuracy,
        "fresh_2000_clean": {k: clean[k] for k in keys},
        "fresh_2000_blur_noise": {k: degraded[k] for k in keys},
        "held_out_pairs_clean": clean["held_out"]["all"],
    })


if __name__ == "__main__":
    main()
