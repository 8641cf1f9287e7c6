"""The measured effect of loss guidance at fixed seeds: colour distance and class share against scale.

Colour: a trained model (for example the unit-1 style model trained on CIFAR-10 images), sampled at
scales 0 (unguided), ..., with the colour term; the mean absolute distance of the samples' pixels
to the target colour (in [-1, 1] units, the colour term's own loss), and a sample grid per scale.
Classifier: a model trained on labelled data (for example digits) sampled with the `classifier` term
for one class, using the classifier `difflab eval` trains (cached); the chosen class's share of the
samples is judged by that classifier and by a second one trained with another seed, so the figure
is not only the guiding network agreeing with itself.

    python bench/guidance_effect.py --color-model runs/cifar16 --classifier-model runs/digits16 \
        --grid-dir docs/images
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import emit
from difflab.data import open_dataset
from difflab.diffusion.generate import generate
from difflab.diffusion.guidance import classifier_guidance, color_guidance, color_loss, parse_color
from difflab.diffusion.request import GenerationRequest
from difflab.images import make_grid, save_png
from difflab.metrics.classifier import load_or_train, train_classifier
from difflab.storage.folder import load_model


def colour_effect(args) -> dict:
    model = load_model(args.color_model)
    rgb = parse_color(args.color)
    distance = color_loss(rgb)
    rows = []
    for scale in args.color_scales:
        started = time.perf_counter()
        terms = [color_guidance(rgb, scale)] if scale else []
        images = generate(model, GenerationRequest(args.n, sampler=args.sampler, steps=args.steps, seed=args.seed,
                                                   guidance=terms, guidance_mode=args.mode), batch_size=args.batch)
        rows.append({"scale": scale, "mean_distance": round(distance(images * 2 - 1).mean().item(), 4),
                     "seconds": round(time.perf_counter() - started, 1)})
        if args.grid_dir:
            save_png(make_grid(images[:16], 8), Path(args.grid_dir) / f"guidance_color_{scale:g}.png",
                     {"model": str(args.color_model), "guide": f"color={args.color}:{scale:g}", "seed": args.seed})
    base = rows[0]["mean_distance"]
    for row in rows:
        row["relative_to_unguided"] = round(row["mean_distance"] / base, 3)
    return {"model": str(args.color_model), "color": args.color, "rows": rows}


def classifier_effect(args) -> dict:
    model = load_model(args.classifier_model)
    info = model.info
    data = args.classifier_data or info.data
    train = open_dataset(data, info.image_size, info.channels, split="train")
    test = open_dataset(data, info.image_size, info.channels, split="test")
    if args.classifier_steps:  # the same network and recipe as difflab eval's, trained for fewer steps
        guide = train_classifier(train, test, steps=args.classifier_steps, seed=0)
    else:
        guide = load_or_train(data, train, test)
    judge = train_classifier(train, test, steps=args.classifier_steps, seed=1)
    index = guide.class_names.index(args.target_class)
    rows = []
    for scale in args.classifier_scales:
        terms = [classifier_guidance(guide.network, index, scale)] if scale else []
        images = generate(model, GenerationRequest(args.n, sampler=args.sampler, steps=args.steps, seed=args.seed,
                                                   guidance=terms, guidance_mode=args.mode),
                          batch_size=args.batch) * 2 - 1
        shares = {name: round((c.features_and_predictions(images)[1] == index).float().mean().item(), 4)
                  for name, c in (("guiding_classifier", guide), ("independent_classifier", judge))}
        rows.append({"scale": scale, "class_share": shares})
        if args.grid_dir:
            save_png(make_grid((images[:16] + 1) / 2, 8),
                     Path(args.grid_dir) / f"guidance_classifier_{scale:g}.png",
                     {"model": str(args.classifier_model), "guide": f"classifier={args.target_class}:{scale:g}"})
    return {"model": str(args.classifier_model), "data": data, "class": args.target_class,
            "classifier_steps": args.classifier_steps or "difflab eval's",
            "classifier_test_accuracy": {"guiding": round(guide.test_accuracy, 4),
                                         "independent": round(judge.test_accuracy, 4)},
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--color-model")
    parser.add_argument("--color", default="#55FFAA")
    parser.add_argument("--color-scales", type=float, nargs="+", default=[0, 10, 20, 40, 80])
    parser.add_argument("--classifier-model")
    parser.add_argument("--classifier-data", help="labelled data for the classifiers (default: the model's own)")
    parser.add_argument("--classifier-steps", type=int,
                        help="train both classifiers for this many steps (default: difflab eval's cached one, "
                             "and the same recipe for the independent one)")
    parser.add_argument("--target-class", default="3")
    parser.add_argument("--classifier-scales", type=float, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--sampler", default="dpm++2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", default="fast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--grid-dir", help="write a grid of the first 16 samples per scale here")
    args = parser.parse_args()

    result = {"benchmark": "guidance_effect", "setup": {k: getattr(args, k) for k in ("n", "sampler", "steps", "mode",
                                                                                      "seed")}}
    if args.color_model:
        result["color"] = colour_effect(args)
    if args.classifier_model:
        result["classifier"] = classifier_effect(args)
    emit(result)


if __name__ == "__main__":
    main()
