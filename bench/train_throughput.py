"""Training images/s of difflab's trainer against a plain PyTorch + diffusers loop.

Same model, batch, data (in memory), noise schedule, AdamW, gradient clipping, EMA and full precision
(difflab's default bf16 on AMX CPUs is measured in recipe_speed.py); the plain loop does nothing else.
Runs alternate, and the median of several is reported.

    python bench/train_throughput.py [--preset small] [--image-size 16] [--batch 64] [--steps 60]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F

from common import emit, median
from difflab.config import TrainConfig
from difflab.data import open_dataset
from difflab.training.trainer import Trainer


def difflab_rate(args, workdir) -> float:
    config = TrainConfig()
    config.data.spec, config.data.image_size = "digits", args.image_size
    config.model.preset = args.preset
    config.optim.batch_size = args.batch
    config.optim.precision = "no"  # like the plain loop: the loops are compared, not the arithmetic
    config.run.steps = args.warmup + args.steps
    config.run.sample_every = config.run.checkpoint_every = 0
    config.run.sample_count, config.run.sample_steps = 1, 1
    trainer = Trainer(config, f"{workdir}/run", overwrite=True)
    stamps = {}
    step = trainer.train_step

    def timed_step():  # time stamps at step starts: the interval covers everything the loop does
        stamps[trainer.state.step] = time.perf_counter()
        return step()

    trainer.train_step = timed_step
    trainer.fit()
    seconds = stamps[args.warmup + args.steps - 1] - stamps[args.warmup - 1]
    return args.steps * args.batch / seconds


def plain_rate(args) -> float:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from difflab.models.presets import build_unet

    data = open_dataset("digits", args.image_size).images
    unet = build_unet(args.preset, args.image_size, 1)
    schedule = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=0.999, foreach=True)
    generator = torch.Generator().manual_seed(0)
    start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        index = torch.randint(0, len(data), (args.batch,), generator=generator)
        x0 = data[index].float() / 127.5 - 1
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (args.batch,), generator=generator)
        loss = F.mse_loss(unet(schedule.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
    return args.steps * args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp()
    ours, plain = [], []
    try:
        for _ in range(args.repeats):
            plain.append(plain_rate(args))
            ours.append(difflab_rate(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    emit({
        "benchmark": "train_throughput",
        "setup": {k: getattr(args, k) for k in ("preset", "image_size", "batch", "steps", "repeats")},
        "difflab_images_per_s": round(median(ours), 1),
        "plain_loop_images_per_s": round(median(plain), 1),
        "ratio": round(median(ours) / median(plain), 3),
        "target_ratio": 0.95,
        "runs": {"difflab": [round(r, 1) for r in ours], "plain": [round(r, 1) for r in plain]},
    })


if __name__ == "__main__":
    main()
