"""The teaching model against the real one: BasicUNet (`difflab scratch train`) and a diffusers
UNet2DModel preset (`difflab train`), trained for the same steps on the same images, side by side.

Both runs use the same data, batch size, step budget and seed, and each its own recipe: the course's
x₀-prediction with uniform-noise corruption and its naive sampler, against difflab's defaults
(cosine schedule, v-prediction, EMA, DPM-Solver++). Writes the two final sample grids side by side
and prints JSON: parameters, training seconds, images/s and final loss of each.

    python bench/scratch_vs_diffusers.py --data mnist:/work/shared/datasets/mnist \
        --steps 300 --out docs/images/scratch_vs_diffusers.png
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from common import emit
from difflab.config import ScratchConfig, TrainConfig
from difflab.images import save_png
from difflab.training.scratch_trainer import train_scratch
from difflab.training.trainer import Trainer


def last_row(run: Path) -> dict:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def figures(run: Path, parameters: int) -> dict:
    row = last_row(run)
    return {"parameters": parameters, "train_seconds": float(row["seconds"]),
            "images_per_s": float(row["images_per_s"]), "final_loss": float(row["loss"])}


def side_by_side(left: Path, right: Path, titles: tuple[str, str]) -> Image.Image:
    """Two grids next to each other, each under its title."""
    grids = [Image.open(left).convert("RGB"), Image.open(right).convert("RGB")]
    gap, title_h = 16, 34
    width = sum(g.width for g in grids) + gap
    out = Image.new("RGB", (width, max(g.height for g in grids) + title_h), "white")
    draw = ImageDraw.Draw(out)
    x = 0
    for grid, title in zip(grids, titles):
        draw.multiline_text((x + 2, 3), title, fill="black", spacing=3)
        out.paste(grid, (x, title_h))
        x += grid.width + gap
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="data spec (the docs use mnist:PATH)")
    parser.add_argument("--preset", default="small", help="diffusers UNet preset (tiny, small)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--count", type=int, default=36, help="images per grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice); 1 is steadier "
                        "on a machine shared with other work")
    parser.add_argument("--workdir", type=Path, help="keep both run folders here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("scratch_vs_diffusers.png"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scratch_vs_diffusers_"))

    scratch = ScratchConfig()
    scratch.data.spec = args.data
    scratch.optim.batch_size = args.batch
    scratch.run.steps, scratch.run.seed = args.steps, args.seed
    scratch.run.sample_every, scratch.run.sample_count = 0, args.count
    train_scratch(scratch, workdir / "scratch", overwrite=True)

    real = TrainConfig()
    real.data.spec, real.model.preset = args.data, args.preset
    real.optim.batch_size = args.batch
    real.run.steps, real.run.seed = args.steps, args.seed
    real.run.sample_every = real.run.checkpoint_every = 0
    real.run.sample_count = args.count
    trainer = Trainer(real, workdir / "diffusers", overwrite=True)
    trainer.fit()

    from difflab.models.scratch import BasicUNet

    image_size = trainer.config.data.image_size
    channels = trainer.config.data.channels
    basic_params = sum(p.numel() for p in BasicUNet(channels, channels).parameters())
    unet_params = sum(p.numel() for p in trainer.model.unet.parameters())
    grid = f"step_{args.steps:06d}.png"
    titles = (f"BasicUNet (difflab.scratch), {basic_params / 1e6:.2f} M\n"
              + f"naive sampler, {scratch.run.sample_steps} steps",
              f"diffusers UNet2DModel ({args.preset}), {unet_params / 1e6:.2f} M\n"
              + f"{real.run.sample_sampler}, {real.run.sample_steps} steps")
    picture = side_by_side(workdir / "scratch" / "samples" / grid, workdir / "diffusers" / "samples" / grid, titles)
    save_png(picture, args.out, {"data": args.data, "steps": args.steps, "batch": args.batch, "seed": args.seed,
                                 "preset": args.preset})
    emit({
        "benchmark": "scratch_vs_diffusers",
        "setup": {"data": args.data, "image_size": image_size, "steps": args.steps, "batch": args.batch,
                  "seed": args.seed, "preset": args.preset},
        "basic_unet": {**figures(workdir / "scratch", basic_params), "objective": "x0 from uniform-noise mix",
                       "sampler": f"naive, {scratch.run.sample_steps} steps"},
        "diffusers_unet": {**figures(workdir / "diffusers", unet_params),
                           "objective": f"{real.model.prediction} ({real.model.schedule} schedule)",
                           "sampler": f"{real.run.sample_sampler}, {real.run.sample_steps} steps"},
        "figure": str(args.out),
        "runs": str(workdir),
    })


if __name__ == "__main__":
    main()
