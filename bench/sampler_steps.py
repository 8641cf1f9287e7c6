"""Steps against quality: Fréchet distance and class accuracy against the number of model evaluations,
for several samplers and step counts, on one trained model.

    python bench/sampler_steps.py --model runs/bench-class-conditional/difflab -n 1000 \
        --plot docs/images/sampler_steps.png
"""

from __future__ import annotations

import argparse

from common import emit

SETTINGS = [("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("ddim", 10), ("dpm++2m", 20), ("dpm++2m", 10), ("unipc", 10)]


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["model_evaluations"])
        x = [r["model_evaluations"] for r in mine]
        left.plot(x, [r["frechet_distance"] for r in mine], "o-", label=sampler)
        if "class_accuracy" in mine[0]:
            right.plot(x, [100 * r["class_accuracy"] for r in mine], "o-", label=sampler)
    left.axhline(rows[0]["frechet_floor"], color="grey", ls="--", lw=1, label="real-data floor")
    for ax, label in ((left, "Fréchet distance (lower is better)"), (right, "class accuracy, %")):
        ax.set_xscale("log")
        ax.set_xlabel("model evaluations per image")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", help="default: the model's training data")
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: difflab's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="write the figure here")
    parser.add_argument("--settings", default=",".join(f"{s}:{n}" for s, n in SETTINGS),
                        help="comma-separated SAMPLER:STEPS pairs (default: %(default)s)")
    args = parser.parse_args()
    settings = [(item.split(":")[0], int(item.split(":")[1])) for item in args.settings.split(",")]

    from difflab.diffusion.samplers import scheduler_for
    from difflab.metrics.evaluate import Evaluator
    from difflab.models.model import DEFAULT_CFG_SCALE
    from difflab.storage.folder import load_model

    model = load_model(args.model)
    cfg = DEFAULT_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    evaluator = Evaluator.for_data(args.data or model.info.data, model.info.image_size, model.info.channels)
    floor = evaluator.floor(args.n)
    rows = []
    for sampler, steps in settings:
        scheduler = scheduler_for(sampler, model.noise_schedule.config)
        scheduler.set_timesteps(steps)
        result = evaluator(model, args.n, sampler=sampler, steps=steps, cfg_scale=cfg, seed=args.seed)
        rows.append({**result, "model_evaluations": len(scheduler.timesteps), "frechet_floor": round(floor, 4)})
        print(f"{sampler} {steps}: {result['frechet_distance']:.3f} {result.get('class_accuracy')}", flush=True)
    if args.plot:
        plot(rows, args.plot)
    emit({"benchmark": "sampler_steps", "model": args.model, "n": args.n, "cfg_scale": cfg, "rows": rows})


if __name__ == "__main__":
    main()
