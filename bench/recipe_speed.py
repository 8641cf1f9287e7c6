"""Training speed of the levers a recipe search turns: model width, precision, memory format, compile.

One training step (UNet forward and backward, AdamW) on random MNIST-sized batches, for each
combination asked for; images/s is the median over the timed steps after warm-up (compilation
happens during warm-up and is reported separately, since a short run pays it).

    python bench/recipe_speed.py --image-size 28 --batch 64 --presets small,tiny \
        --precisions no,bf16 --formats contiguous,channels_last --compile no,yes
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from common import emit, median
from difflab.models.presets import build_unet


def rate(preset: str, precision: str, memory_format: str, compiled: bool, args) -> dict:
    torch.manual_seed(0)
    unet = build_unet(preset, args.image_size, args.channels, num_class_embeds=11)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    unet = unet.to(memory_format=fmt)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    forward = torch.compile(unet) if compiled else unet
    x = torch.randn(args.batch, args.channels, args.image_size, args.image_size).to(memory_format=fmt)
    labels = torch.randint(0, 10, (args.batch,))

    def step() -> None:
        t = torch.randint(0, 1000, (args.batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.mse_loss(forward(x, t, class_labels=labels).sample.float(), x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"preset": preset, "precision": precision, "memory_format": memory_format, "compile": compiled,
            "parameters": sum(p.numel() for p in unet.parameters()),
            "images_per_s": round(args.batch / median(times), 1), "warmup_s": round(warmup_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--presets", default="small")
    parser.add_argument("--precisions", default="no,bf16")
    parser.add_argument("--formats", default="contiguous,channels_last")
    parser.add_argument("--compile", default="no,yes")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    rows = [rate(p, prec, fmt, c == "yes", args) for p, prec, fmt, c in itertools.product(
        args.presets.split(","), args.precisions.split(","), args.formats.split(","), args.compile.split(","))]
    emit({"benchmark": "recipe_speed", "image_size": args.image_size, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()
