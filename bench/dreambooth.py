"""DreamBooth on the shapes text-to-image model: teach it a subject it never saw (a star) from 5 images.

Four runs of `difflab dreambooth` (full fine-tune and LoRA, each with and without prior preservation) and
one of `difflab textual-inversion` (only the new token "sks"'s embedding rows learn, from --ti-init-word),
each run in this process (its seconds leave out Python's start-up), measured DreamBooth-paper style with
the shapes attribute reader's features:

- subject fidelity: mean cosine similarity of the reader's features of "a sks shape" samples to those of
  the instance images (and the base model's samples of the same prompt, as the floor);
- recontextualisation: the share of "a blue sks shape at the bottom right" samples that the reader sees
  blue and at the bottom right (the instance stars are red, in the centre);
- prior preservation: prompt adherence and Fréchet distance of the base model's own prompts
  (`difflab.metrics.prompt_adherence.evaluate_prompts`) before and after: the language drift that prior
  preservation exists to prevent;
- what each run saves: the LoRA file and learned_embeds.safetensors against the full model's UNet.

    python bench/dreambooth.py --base runs/shapes-text/model --out runs/bench-dreambooth
    python bench/dreambooth.py --base BASE --out /tmp/db --quick   # a check that it runs (seconds)

The base model is one `difflab train --data shapes --conditioning text` made. Grids (the instance images,
then each setting's samples) are written to --out.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import emit

INSTANCE_PROMPT = "a sks shape"
CLASS_PROMPT = "a shape"
RECONTEXT_PROMPT = "a blue sks shape at the bottom right"
SETTINGS = {  # name: (LoRA?, prior preservation?); textual inversion: neither, its own command
    "full": (False, False), "full+prior": (False, True), "lora": (True, False), "lora+prior": (True, True),
    "textual-inversion": (False, False)}
TEXTUAL_INVERSION = "textual-inversion"
TOKEN = "sks"  # the instance prompt's word becomes the learnt token, so every row is measured on the same prompts


def star(size: int, rng: np.random.Generator, colour=(220, 40, 40)) -> np.ndarray:
    """A red five-pointed star near the centre on white (the shapes renderer's colours and background),
    turned and sized a little differently each time: a subject the shapes data never holds."""
    side = size * 4
    image = Image.new("RGB", (side, side), (255, 255, 255))
    cx, cy = side * (0.5 + rng.uniform(-0.03, 0.03)), side * (0.5 + rng.uniform(-0.03, 0.03))
    outer, turn = side * 0.2 * rng.uniform(0.9, 1.1), rng.uniform(-0.3, 0.3)
    points = [(cx + (outer if i % 2 == 0 else outer * 0.45) * math.cos(math.pi * i / 5 - math.pi / 2 + turn),
               cy + (outer if i % 2 == 0 else outer * 0.45) * math.sin(math.pi * i / 5 - math.pi / 2 + turn))
              for i in range(10)]
    ImageDraw.Draw(image).polygon(points, fill=colour)
    return np.array(image.reduce(4))


def write_instances(folder: Path, count: int, size: int) -> torch.Tensor:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = [star(size, rng) for _ in range(count)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"star_{i}.png")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def run_dreambooth(base: str, instances: Path, out: Path, lora: bool, prior: bool, a) -> float:
    """One `difflab dreambooth` run; its wall-clock seconds."""
    command = ["-q", "dreambooth", "--model", base, "--instance-data", str(instances),
               "--instance-prompt", INSTANCE_PROMPT, "--out", str(out), "--overwrite", "--steps", str(a.steps),
               "--sample-steps", str(a.sample_steps), "--validation-prompt", f"{INSTANCE_PROMPT}|{RECONTEXT_PROMPT}",
               "--sample-every", str(max(1, a.steps // 4)), "--checkpoint-every", "0"]
    if lora:
        command += ["--lora", "--rank", str(a.rank)]
    if prior:
        command += ["--prior-preservation", "--class-prompt", CLASS_PROMPT, "--num-class-images", str(a.class_images)]
    if a.lr:
        command += ["--lr", str(a.lr_lora if lora else a.lr)]
    return timed_run(command)


def run_textual_inversion(base: str, instances: Path, out: Path, a) -> float:
    """One `difflab textual-inversion` run; its wall-clock seconds."""
    command = ["-q", "textual-inversion", "--model", base, "--data", str(instances),
               "--token", TOKEN, "--init-word", a.ti_init_word, "--num-vectors", str(a.ti_vectors), "--out", str(out),
               "--overwrite", "--steps", str(a.ti_steps or a.steps), "--sample-steps", str(a.sample_steps),
               "--validation-prompt", f"{INSTANCE_PROMPT}|{RECONTEXT_PROMPT}",
               "--sample-every", str(max(1, (a.ti_steps or a.steps) // 4)), "--checkpoint-every", "0"]
    if a.ti_lr:
        command += ["--lr", str(a.ti_lr)]
    return timed_run(command)


def timed_run(argv: list[str]) -> float:
    """One difflab command run in this process (the imports a fresh one repeats took a quarter of a quick
    run); its wall-clock seconds."""
    from difflab.cli import main as difflab_main

    started = time.perf_counter()
    if difflab_main(argv) != 0:
        raise SystemExit(f"difflab {' '.join(argv[:2])} failed")
    return time.perf_counter() - started


def measure(model, reader, instance_features: torch.Tensor, class_features: torch.Tensor, a) -> dict:
    """Subject fidelity, recontextualisation and the base prompts' adherence of one model. `class_features`:
    the base model's own "a shape" samples, the other side of the nearest-neighbour test."""
    from difflab.data.shapes import Scene, Shape
    from difflab.diffusion.generate import generate
    from difflab.diffusion.request import GenerationRequest
    from difflab.metrics.attributes import adherence
    from difflab.metrics.prompt_adherence import evaluate_prompts

    sample = dict(sampler=a.sampler, steps=a.sample_steps, seed=1000)
    subject = generate(model, GenerationRequest(a.samples, prompts=INSTANCE_PROMPT, **sample)) * 2 - 1
    features = torch.nn.functional.normalize(reader.features(subject), dim=1)
    fidelity = (features @ instance_features.T).mean().item()
    # the share of samples whose nearest neighbour (reader features) is an instance image, not a base-model shape
    to_instances = (features @ instance_features.T).max(dim=1).values
    subject_share = (to_instances > (features @ class_features.T).max(dim=1).values).float().mean().item()
    moved = generate(model, GenerationRequest(a.samples, prompts=RECONTEXT_PROMPT, **sample)) * 2 - 1
    asked = Scene((Shape(None, "blue", "bottom right"),))
    recontext = adherence(moved, [asked] * a.samples, reader)
    prompts = evaluate_prompts(model, a.eval_n, sampler=a.sampler, steps=a.sample_steps, cfg_scale=None, reader=reader)
    return {
        "subject_fidelity": round(fidelity, 4),
        "subject_share_nearest_neighbour": round(subject_share, 4),
        "recontext": {"colour": recontext["colour"], "position": recontext["position"], "both": recontext["all"]},
        "base_prompts": {"adherence_all": prompts["adherence"]["all"],
                         "frechet_distance": prompts["frechet_distance"]},
        "_grid": torch.cat([subject[:8], moved[:8]]).add(1).div(2),
    }


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    from difflab.images import make_grid, save_png

    save_png(make_grid(images, columns), path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a shapes text-to-image model (difflab train --data shapes "
                                                 "--conditioning text)")
    p.add_argument("--out", type=Path, required=True, help="folder for the runs, the instance images and the grids")
    p.add_argument("--instances", type=int, default=5)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--class-images", type=int, default=100)
    p.add_argument("--lr", type=float, help="full fine-tune learning rate (default: difflab dreambooth's)")
    p.add_argument("--lr-lora", type=float, help="LoRA learning rate with --lr (default: difflab dreambooth's)")
    p.add_argument("--samples", type=int, default=64, help="samples per prompt for fidelity and recontextualisation")
    p.add_argument("--eval-n", type=int, default=200, help="base-model prompts for the prior-preservation check")
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of: {', '.join(SETTINGS)}")
    p.add_argument("--ti-steps", type=int, help="textual inversion steps (default: --steps)")
    p.add_argument("--ti-lr", type=float, help="textual inversion learning rate (default: difflab textual-inversion's)")
    p.add_argument("--ti-init-word", default="triangle", help="the word the token starts from (default triangle: the "
                                                              "pointed shape the base model knows)")
    p.add_argument("--ti-vectors", type=int, default=1, help="textual inversion vectors (default 1)")
    p.add_argument("--quick", action="store_true", help="tiny settings, to check that the script runs")
    p.add_argument("--reuse", action="store_true", help="measure the runs already in --out instead of training them")
    a = p.parse_args()
    if a.quick:
        a.steps, a.class_images, a.samples, a.eval_n, a.sample_steps, a.ti_steps = 2, 2, 4, 4, 2, 2
    if a.lr and not a.lr_lora:
        p.error("give --lr-lora with --lr")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from difflab.metrics.attributes import load_or_train_attributes
    from difflab.models.embeddings import EMBEDDING_FILE
    from difflab.storage.folder import load_model
    from difflab.storage.lora import LORA_WEIGHTS, apply_lora

    base = load_model(a.base)
    size = base.info.image_size
    reader_settings = dict(train_images=64, test_images=16, steps=5) if a.quick else {}
    reader = load_or_train_attributes(size, **reader_settings)
    instances = write_instances(a.out / "instances", a.instances, size)
    instance_features = torch.nn.functional.normalize(reader.features(instances), dim=1)
    save_grid(instances.add(1).div(2), a.out / "instances.png", a.instances)

    from difflab.diffusion.generate import generate
    from difflab.diffusion.request import GenerationRequest

    shapes = generate(base, GenerationRequest(a.samples, prompts=CLASS_PROMPT, sampler=a.sampler, steps=a.sample_steps,
                                              seed=5000))
    class_features = torch.nn.functional.normalize(reader.features(shapes * 2 - 1), dim=1)
    before = measure(base, reader, instance_features, class_features, a)
    save_grid(before.pop("_grid"), a.out / "base.png")
    results = {}
    for name in a.settings.split(","):
        lora, prior = SETTINGS[name]
        run = a.out / name
        reused = a.reuse and (run / "model").is_dir()
        if name == TEXTUAL_INVERSION:
            seconds = None if reused else run_textual_inversion(a.base, a.out / "instances", run, a)
            model = load_model(a.base)
            model.load_textual_inversion(run)
            saved = (run / "model" / EMBEDDING_FILE).stat().st_size
        else:
            seconds = None if reused else run_dreambooth(a.base, a.out / "instances", run, lora, prior, a)
            if lora:
                model = load_model(a.base)
                apply_lora(model, run)
                saved = (run / "model" / LORA_WEIGHTS).stat().st_size
            else:
                model = load_model(run)
                saved = (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
        figures = measure(model, reader, instance_features, class_features, a)
        save_grid(figures.pop("_grid"), a.out / f"{name}.png")
        results[name] = {"seconds": seconds and round(seconds, 1), "minutes": seconds and round(seconds / 60, 2),
                         "saved_mib": round(saved / 2**20, 4), "saved_bytes": saved, **figures}
    from difflab.storage.folder import resolve_model_folder

    full_unet = resolve_model_folder(a.base) / "unet" / "diffusion_pytorch_model.safetensors"
    emit({
        "benchmark": "dreambooth",
        "base": a.base, "instances": a.instances, "steps": a.steps, "rank": a.rank, "class_images": a.class_images,
        "textual_inversion": {"token": TOKEN, "init_word": a.ti_init_word, "vectors": a.ti_vectors,
                              "steps": a.ti_steps or a.steps, "lr": a.ti_lr},
        "prompts": {"instance": INSTANCE_PROMPT, "class": CLASS_PROMPT, "recontext": RECONTEXT_PROMPT},
        "samples": a.samples, "eval_n": a.eval_n, "sampler": a.sampler, "sample_steps": a.sample_steps,
        "quick": a.quick,
        "base_model": before,
        "runs": results,
        "full_unet_mib": round(full_unet.stat().st_size / 2**20, 3) if full_unet.is_file() else None,
        "reader_test_accuracy": reader.test_accuracy,
    })


if __name__ == "__main__":
    main()
