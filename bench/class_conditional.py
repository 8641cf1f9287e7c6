"""Quality per CPU-minute: the course's class-conditioned MNIST recipe against difflab's defaults.

Both recipes train for the same wall-clock budget with `difflab train`, then are measured by the same
`difflab eval` (same n, seed and held-out images). Each run is a fresh process.

    python bench/class_conditional.py --data mnist:../shared/datasets/mnist --minutes 10 -n 1000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import emit

HERE = Path(__file__).parent

# The course's unit-2 notebook: a 4-dimensional class embedding as extra input channels, UNet2DModel
# channels 32, 64, 64 with two layers per block and attention in the two lower blocks, the cosine
# schedule, epsilon prediction, Adam at lr 1e-3 (AdamW without decay is the same), batch 128, no
# warmup, no EMA, no label dropout (so no CFG), full precision, no gradient clipping.
COURSE = {
    "train": ["--model", str(HERE / "course_mnist_unet.json"), "--class-method", "channels", "--class-embed-dim", "4",
              "--schedule", "cosine", "--prediction", "epsilon", "--lr", "1e-3", "--warmup-steps", "0",
              "--lr-schedule", "constant", "--batch-size", "128", "--ema-decay", "0", "--cond-dropout", "0",
              "--precision", "no", "--clip-grad", "0"],
    "eval": ["--cfg-scale", "1"],
}
DIFFLAB = {"train": [], "eval": []}  # the defaults of `difflab train --conditioning class` and `difflab eval`


def difflab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "difflab", "-q", *args], capture_output=True, text=True, check=True)


def run(name: str, recipe: dict, args) -> dict:
    out = Path(args.workdir) / name
    difflab("train", "--data", args.data, "--conditioning", "class", "--minutes", str(args.minutes),
            "--sample-every", "0", "--checkpoint-every", "0", "--sample-count", "80", "--seed", str(args.seed),
            "--out", str(out), "--overwrite", *recipe["train"])
    training = json.loads((out / "model" / "difflab.json").read_text())["training"]
    result = json.loads(difflab("eval", "--model", str(out), "-n", str(args.n), "--seed", str(args.seed),
                                *recipe["eval"], *args.eval_args).stdout)
    return {"recipe": name, "train_flags": recipe["train"], "optimizer_steps": training["steps"],
            "images_seen": training["images_seen"], "training_minutes": training["minutes"], **result,
            "grid": str(sorted((out / "samples").glob("*.png"))[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist:../shared/datasets/mnist")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/bench-class-conditional")
    parser.add_argument("--recipes", default="course,difflab")
    parser.add_argument("--eval-args", nargs="*", default=[], help="extra flags for difflab eval (both recipes)")
    args = parser.parse_args()
    recipes = {"course": COURSE, "difflab": DIFFLAB}
    rows = [run(name, recipes[name], args) for name in args.recipes.split(",")]
    emit({"benchmark": "class_conditional", "data": args.data, "minutes": args.minutes, "n": args.n,
          "seed": args.seed, "rows": rows,
          "targets": {"class_accuracy": ">= 0.97", "frechet_distance": "<= 5 x frechet_floor"}})


if __name__ == "__main__":
    main()
