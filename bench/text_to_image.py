"""A text-to-image model trained from scratch on the built-in `shapes`: prompt adherence per CPU-minute.

Trains `difflab train --data shapes --conditioning text` (a VAE stage, then the UNet with its text
encoder), measures it with `difflab eval` (colour, shape and position adherence on combinations seen
in training and held out of it, Fréchet distance in the attribute reader's feature space and its
real-data floor), then the same model against the classifier-free guidance scale and the sampler's
steps, writes a prompt grid per guidance scale, and trains the same data in pixel space (`--model pixel`)
for the same wall-clock time as a row for comparison. Each command is a fresh process.

    python bench/text_to_image.py --minutes 16.5 -n 500 --workdir runs/bench-t2i   # VAE ~3 min + UNet: 20 min
    python bench/text_to_image.py --cifar ../shared/datasets/cifar10-test-jpg --cifar-minutes 30   # + CIFAR-10
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from common import GRID_PROMPTS, emit

CFG_SCALES = (0, 1, 2, 3, 5, 7.5)
STEPS = (5, 10, 20, 50)


def difflab(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "difflab", "-q", *args], capture_output=True, text=True,
                          check=True).stdout


def train(out: Path, minutes: float | None, *flags: str) -> dict:
    budget = ["--minutes", str(minutes)] if minutes else []
    difflab("train", "--data", "shapes", "--conditioning", "text", *budget, "--sample-every", "0",
            "--checkpoint-every", "0", "--out", str(out), "--overwrite", *flags)
    training = json.loads((out / "model" / "difflab.json").read_text())["training"]
    vae_seconds = 0.0
    if (out / "vae" / "metrics.csv").is_file():
        rows = [r for r in csv.DictReader((out / "vae" / "metrics.csv").open()) if r["seconds"]]
        vae_seconds = float(rows[-1]["seconds"])
    return {"unet_steps": training["steps"], "unet_minutes": training["minutes"],
            "vae_minutes": round(vae_seconds / 60, 2), "vae_psnr": training.get("vae_psnr"),
            "total_minutes": round(training["minutes"] + vae_seconds / 60, 2)}


def evaluate(model: Path, n: int, *flags: str) -> dict:
    result = json.loads(difflab("eval", "--model", str(model), "-n", str(n), *flags))
    row = {"frechet_distance": result["frechet_distance"], "frechet_floor": result["frechet_floor"],
           "cfg_scale": result["cfg_scale"], "steps": result["steps"]}
    for part in ("seen", "held_out"):
        shares = result["adherence"].get(part, {})
        row[part] = {k: shares[k] for k in ("colour", "shape", "position", "all") if k in shares}
    row["reader_accuracy"] = result["adherence"]["classifier_test_accuracy"]
    if "vae_ceiling" in result:
        row["vae_ceiling"] = result["vae_ceiling"]
    return row


def grids(model: Path, out: Path) -> list[str]:
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(GRID_PROMPTS) + "\n")
    paths = []
    for scale in CFG_SCALES:
        path = out / f"grid_cfg{scale}.png"
        difflab("sample", "--model", str(model), "--prompt-file", str(prompts), "-n", "6", "--cfg-scale", str(scale),
                "--seed", "0", "--out", str(path))
        paths.append(str(path))
    return paths


CIFAR_CFG_SCALES = (1.5, 3, 7.5)  # the class model's default, between, the text model's default


def cifar_rows(args) -> list[dict]:
    """CIFAR-10 with captions from its labels, as a latent text model and as a pixel-space one (`--model
    pixel`), against the class-conditional pixel model, for the same minutes in all (the latent model's VAE
    stage takes its share of them); each at a few CFG scales, with the latent model's VAE ceiling."""
    rows = []
    work = Path(args.workdir)
    text = ["--conditioning", "text", "--caption-template", "a photo of a {label}"]
    for name, flags in (("text (latent)", text), ("text (pixel)", [*text, "--model", "pixel"]),
                        ("class (pixel)", ["--conditioning", "class"])):
        out = work / ("cifar-" + name.replace(" (", "-").rstrip(")"))
        difflab("train", "--data", args.cifar, "--split", "all", "--minutes", str(args.cifar_minutes),
                "--sample-every", "0", "--checkpoint-every", "0", "--out", str(out), "--overwrite", *flags)
        training = json.loads((out / "model" / "difflab.json").read_text())["training"]
        for scale in CIFAR_CFG_SCALES:
            result = json.loads(difflab("eval", "--model", str(out), "--data", args.cifar, "-n", str(args.n),
                                        "--cfg-scale", str(scale)))
            rows.append({"model": name, "unet_steps": training["steps"], "vae": training.get("vae"),
                         "vae_psnr": training.get("vae_psnr"), "cfg_scale": scale,
                         "class_accuracy": result.get("class_accuracy"), "frechet_distance": result["frechet_distance"],
                         "frechet_floor": result.get("frechet_floor"), "vae_ceiling": result.get("vae_ceiling")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae-steps", type=int, help="the VAE stage's steps (default: difflab's)")
    parser.add_argument("--minutes", type=float, default=16.5, help="the UNet's training minutes (after the VAE)")
    parser.add_argument("--steps", type=int, help="the UNet's optimizer steps instead of minutes (on a busy machine: "
                                                  "the steps a quiet one makes in the minutes)")
    parser.add_argument("-n", type=int, default=500, help="prompts for the main evaluation")
    parser.add_argument("--table-n", type=int, default=200, help="prompts per row of the CFG and steps tables")
    parser.add_argument("--workdir", default="runs/bench-t2i")
    parser.add_argument("--skip-pixel", action="store_true")
    parser.add_argument("--cifar", help="the CIFAR-10 folder, to add its rows")
    parser.add_argument("--cifar-minutes", type=float, default=30.0, help="each CIFAR-10 model's minutes in all")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script, measures nothing")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    extra = ["--model", "tiny", "--image-size", "16", "--batch-size", "8"] if args.quick else []
    if args.quick:  # a few steps of each part, a few prompts: the script's plumbing, not a measurement
        args.steps, args.vae_steps, args.n, args.table_n = args.steps or 4, args.vae_steps or 4, 8, 8
    latent = work / "latent"
    result = {"benchmark": "text_to_image", "data": "shapes", "vae_steps": args.vae_steps, "minutes": args.minutes,
              "n": args.n}
    budget = ["--steps", str(args.steps)] if args.steps else []
    vae_steps = ["--vae-steps", str(args.vae_steps)] if args.vae_steps else []
    result["latent"] = {**train(latent, None if args.steps else args.minutes, *vae_steps, *budget, *extra),
                        **evaluate(latent, args.n)}
    table = (latent, args.table_n, "--no-record")  # the card keeps the main evaluation
    result["cfg_scales"] = [evaluate(*table, "--cfg-scale", str(s)) for s in CFG_SCALES]
    result["sampler_steps"] = [evaluate(*table, "--steps", str(s)) for s in STEPS]
    result["grids"] = grids(latent, work)
    if not args.skip_pixel:  # the same wall-clock time in pixel space
        pixel = work / "pixel"
        result["pixel"] = {**train(pixel, result["latent"]["total_minutes"], *extra, "--model", "pixel"),
                           **evaluate(pixel, args.n)}
    if args.cifar:
        result["cifar10"] = cifar_rows(args)
    result["targets"] = {"seen": {"colour": ">= 0.95", "shape": ">= 0.90", "position": ">= 0.85"},
                         "held_out": "above chance; goal >= 0.75", "total_minutes": "<= 20"}
    emit(result)


if __name__ == "__main__":
    main()
