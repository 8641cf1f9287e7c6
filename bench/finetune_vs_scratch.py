"""Fine-tuning against training from scratch, across a change of domain (the course's unit-2 claim).

A model is pretrained on MNIST with `difflab train`; then, for the same budget of optimizer steps on
Fashion-MNIST, it is fine-tuned with `difflab finetune` (its defaults: lr 1e-4, 20 warmup steps) and
the same architecture is trained from new weights with `difflab train` (its defaults: lr 1e-3, 100
warmup steps). Both are evaluated on Fashion-MNIST during training (`--eval-every`: the Evaluator of
`difflab eval`, same n, sampler and seed), and their final models once more with `difflab eval`. The
Fashion-MNIST runs go side by side, each a fresh process on one thread.

    python bench/finetune_vs_scratch.py --mnist mnist:../shared/datasets/mnist \\
        --fashion fashion-mnist:../shared/datasets/fashion-mnist --plot docs/images/finetune_vs_scratch.png

A third run (`--finetune-lr`, default 1e-3) fine-tunes with difflab train's learning rate and warmup,
so that the starting weights are the only difference from the run from scratch.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import emit


def difflab(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.Popen([sys.executable, "-m", "difflab", "-q", *args], stdout=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate()
    if process.returncode:
        raise SystemExit(f"{' '.join(process.args)} failed with status {process.returncode}")
    return out


def evaluations(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return [{"step": int(r["step"]), "frechet_distance": float(r["frechet_distance"])}
                for r in csv.DictReader(f) if r.get("frechet_distance")]


def training(run: Path) -> dict:
    return json.loads((run / "model" / "difflab.json").read_text())["training"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", default="mnist:../shared/datasets/mnist")
    parser.add_argument("--fashion", default="fashion-mnist:../shared/datasets/fashion-mnist")
    parser.add_argument("--model", default="small", help="UNet preset")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=1000, help="the budget of each Fashion-MNIST run")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("-n", type=int, default=500, help="images generated for each evaluation")
    parser.add_argument("--sampler-steps", type=int, default=10, help="DPM++ 2M steps for each evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/bench-finetune")
    parser.add_argument("--plot", help="write the Fréchet distance curves to this PNG")
    parser.add_argument("--replot", help="only redraw --plot from this JSON output of an earlier run")
    parser.add_argument("--reuse-pretrain", action="store_true",
                        help="use WORKDIR/pretrain if it holds a finished model (the same settings and seed give the "
                             "same weights)")
    parser.add_argument("--finetune-lr", type=float, nargs="*", default=[1e-3],
                        help="also fine-tune with these learning rates (and the 100 warmup steps of difflab train)")
    args = parser.parse_args()
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        plot(result["runs"], result["pretrained_on_fashion"]["frechet_floor"], args)
        return
    work = Path(args.workdir)
    common = ["--sample-every", "0", "--checkpoint-every", "0", "--seed", str(args.seed), "--overwrite",
              "--batch-size", str(args.batch_size), "--sample-steps", str(args.sampler_steps)]
    evaluation = ["--eval-every", str(args.eval_every), "--eval-count", str(args.n)]
    scoring = ["-n", str(args.n), "--seed", str(args.seed), "--steps", str(args.sampler_steps)]

    started = time.perf_counter()
    pretrain = work / "pretrain"
    if not (args.reuse_pretrain and (pretrain / "model" / "difflab.json").is_file()):
        finish(difflab("train", "--data", args.mnist, "--model", args.model, "--image-size", str(args.image_size),
                       "--steps", str(args.pretrain_steps), "--out", str(pretrain), *common))
    pretrain_minutes = training(pretrain)["minutes"]
    start_point = json.loads(finish(difflab("eval", "--model", str(pretrain), "--data", args.fashion, *scoring)))

    budget = ["--data", args.fashion, "--steps", str(args.steps), *evaluation, *common]
    fine_tune = ["finetune", "--from", str(pretrain / "model")]
    scratch = ["train", "--model", args.model, "--image-size", str(args.image_size)]
    commands = {"finetune": fine_tune, "scratch": scratch}
    for lr in args.finetune_lr:
        commands[f"finetune-lr{lr:g}"] = [*fine_tune, "--lr", str(lr), "--warmup-steps", "100"]
    jobs = {name: difflab(*command, "--out", str(work / name), *budget) for name, command in commands.items()}
    for job in jobs.values():
        finish(job)
    rows = {}
    for name in commands:
        run = work / name
        final = json.loads(finish(difflab("eval", "--model", str(run), *scoring)))
        rows[name] = {"command": commands[name], "evaluations": evaluations(run), "training": training(run),
                      "difflab_eval_final": {k: final[k] for k in ("frechet_distance", "frechet_floor")}}
        if name != "scratch":
            rows[name]["evaluations"].insert(0, {"step": 0, "frechet_distance": start_point["frechet_distance"]})

    if args.plot:
        plot(rows, start_point["frechet_floor"], args)
    emit({"benchmark": "finetune_vs_scratch", "mnist": args.mnist, "fashion": args.fashion, "model": args.model,
          "image_size": args.image_size, "batch_size": args.batch_size, "pretrain_steps": args.pretrain_steps,
          "pretrain_minutes": round(pretrain_minutes, 2), "steps": args.steps, "n": args.n,
          "sampler": f"dpm++2m, {args.sampler_steps} steps", "seed": args.seed,
          "pretrained_on_fashion": start_point, "runs": rows,
          "wall_minutes": round((time.perf_counter() - started) / 60, 1)})


def plot(rows: dict, floor: float, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, row in rows.items():
        steps = [e["step"] for e in row["evaluations"]]
        values = [e["frechet_distance"] for e in row["evaluations"]]
        if name == "scratch":
            label = "from scratch (difflab train: lr 1e-3, 100 warmup steps)"
        elif name == "finetune":
            label = "fine-tuned from MNIST (difflab finetune: lr 1e-4, 20 warmup steps)"
        else:
            label = f"fine-tuned from MNIST, lr {name.removeprefix('finetune-lr')}, 100 warmup steps"
        ax.plot(steps, values, marker="o", label=label)
    ax.axhline(floor, color="grey", linestyle="--", linewidth=1, label=f"real-data floor (n={args.n})")
    ax.set_yscale("log")
    ax.set_xlabel(f"optimizer steps on Fashion-MNIST (batch {args.batch_size}, {args.image_size}×{args.image_size})")
    ax.set_ylabel("Fréchet distance (lower is better)")
    ax.set_title(f"Fashion-MNIST: fine-tuned from MNIST vs from scratch ('{args.model}' UNet, seed {args.seed})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot)


if __name__ == "__main__":
    main()
