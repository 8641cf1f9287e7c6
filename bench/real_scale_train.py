"""One DreamBooth training step at Stable Diffusion 1.5's real size, with each memory feature on and off.

The SD 1.5 folder is bench/real_scale.py's (SD 1.5's published architecture with random weights: no
pretrained weights reach this machine; built once and cached). Each row is a fresh process that builds
difflab's one Trainer for `difflab dreambooth` on it (prior preservation on, one instance and one class
image at 512 px, 2 images a step: diffusers' `--train_batch_size 1` with prior preservation) and times its
training steps:

- what trains: LoRA (rank 4), the full UNet, the full UNet and the text encoder;
- memory features: --gradient-checkpointing, --optimizer adamw8bit / adafactor, --precision bf16 / fp16
  (the frozen VAE, text encoder and LoRA base held in the half type; GPU rows, as bf16 convolutions are
  slow on CPUs without AVX-512 BF16).

Peak memory, as bench/real_scale.py measures sampling: on the CPU the weights' bytes plus the largest
growth of the C allocator's bytes during the steps (gradients, optimizer state, activations); on a GPU
torch.cuda.max_memory_allocated over the steps. Beside it, the estimate the trainer itself made before
its first step (difflab.memory.estimate_training), and their ratio (issue 25's target: within 15%). A
row whose estimate does not fit the machine's available memory is skipped and says so.

    python bench/real_scale_train.py --tiny                      # a scaled-down check (seconds)
    OMP_NUM_THREADS=2 python bench/real_scale_train.py           # real size, CPU rows (about an hour)
    python bench/real_scale_train.py --device cuda               # every row, on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402
from real_scale import build  # noqa: E402

GIB = 1 << 30
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"
# name: (what trains, flags). "off" is plain fp32 AdamW; each later row adds features.
ROWS = {
    "lora": ("lora", {}),
    "lora+ckpt": ("lora", {"gradient_checkpointing": True}),
    "lora+ckpt+half": ("lora", {"gradient_checkpointing": True, "precision": "half"}),
    "unet": ("unet", {}),
    "unet+ckpt": ("unet", {"gradient_checkpointing": True}),
    "unet+ckpt+8bit": ("unet", {"gradient_checkpointing": True, "optimizer": "adamw8bit"}),
    "unet+ckpt+adafactor": ("unet", {"gradient_checkpointing": True, "optimizer": "adafactor"}),
    "unet+ckpt+8bit+half": ("unet", {"gradient_checkpointing": True, "optimizer": "adamw8bit", "precision": "half"}),
    "unet+ckpt+adafactor+half": ("unet", {"gradient_checkpointing": True, "optimizer": "adafactor",
                                          "precision": "half"}),
    "unet+te": ("unet+te", {}),
    "unet+te+ckpt+8bit": ("unet+te", {"gradient_checkpointing": True, "optimizer": "adamw8bit"}),
    "unet+te+ckpt+8bit+half": ("unet+te", {"gradient_checkpointing": True, "optimizer": "adamw8bit",
                                           "precision": "half"}),
}
# On the CPU: fp32 rows, each feature on and off (the half rows are the GPU's).
CPU_ROWS = ("lora", "lora+ckpt", "unet", "unet+ckpt", "unet+ckpt+8bit", "unet+ckpt+adafactor", "unet+te+ckpt+8bit")


# ---- the images ----------------------------------------------------------------------------------------

def write_images(root: Path, size: int) -> tuple[Path, Path]:
    """One instance and one class image (smooth random colour fields at `size` px)."""
    rng = np.random.default_rng(0)
    folders = []
    for name in ("instance", "class"):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / "0.png")
        folders.append(folder)
    return folders[0], folders[1]


# ---- one row -------------------------------------------------------------------------------------------

def half_type(device: str) -> str:
    """The half type a GPU without fast bf16 (compute capability below 8) trains in, else bf16."""
    from difflab.devices import auto_precision

    return "fp16" if device.startswith("cuda") and auto_precision(device) == "fp16" else "bf16"


def row_config(folder: Path, images: Path, row: str, device: str, steps: int, size: int = 512):
    from difflab.config import dreambooth_defaults
    from difflab.training import dreambooth as db

    trains, flags = ROWS[row]
    instance, klass = write_images(images, size)
    c = dreambooth_defaults()
    c.model.base = str(folder)
    d = c.dreambooth
    d.instance_data, d.instance_prompt, d.class_prompt, d.class_data = str(instance), INSTANCE_PROMPT, CLASS_PROMPT, \
        str(klass)
    d.prior_preservation, d.num_class_images = True, 1
    c.model.lora_rank = 4 if trains == "lora" else None
    c.model.train_text_encoder = trains == "unet+te"
    c.optim.batch_size = 2  # one instance and one class image a step, as diffusers' batch 1 with prior preservation
    c.optim.precision = half_type(device) if flags.get("precision") == "half" else "no"
    c.optim.gradient_checkpointing = bool(flags.get("gradient_checkpointing"))
    c.optim.optimizer = flags.get("optimizer", "adamw")
    c.optim.lr = 1e-6
    c.run.device, c.run.steps, c.run.sample_every, c.run.checkpoint_every = device, steps, 0, 0
    return db.check_settings(c)


def trainers_estimate(trainer, size: int):
    """The peak the trainer estimated before its first step (model_setup.check_memory's flags), in bytes."""
    from difflab.memory import ModelShape, estimate_training
    from difflab.training.model_setup import memory_flags

    trains_text = bool(trainer.text and trainer.text.train_text_encoder)
    flags = memory_flags(trainer.config, trainer.accelerator, trainer.model, size, trains_text,
                         textual_inversion=False)
    return estimate_training(ModelShape.of_model(trainer.model), **flags)


def run_row(folder: Path, row: str, device: str, steps: int, size: int = 512) -> dict:
    """Build the Trainer for `row` and time `steps` training steps (what `difflab dreambooth` runs)."""
    from difflab.memory import peak_growth
    from difflab.training import dreambooth as db
    from difflab.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        trainer = Trainer(row_config(folder, scratch / "images", row, device, steps, size), scratch / "run",
                          data=db.make_data)
        setup = time.perf_counter() - started
        estimate = trainers_estimate(trainer, size)
        cuda = trainer.accelerator.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = []

        def train():
            for _ in range(steps):
                start = time.perf_counter()
                trainer.loop.steps.start_step()
                trainer.loop.steps.end_step(trainer.train_step(trainer.batches.next_step()))
                float(trainer.loop.steps.state.step)
                if cuda:
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)

        weights = sum(t.numel() * t.element_size() for m in trainer.model.modules()
                      for t in [*m.parameters(), *m.buffers()])
        growth = peak_growth(train, every=0.005)
        peak = torch.cuda.max_memory_allocated() if cuda else weights + growth
        trained = sum(p.numel() for p in trainer.params)
        result = {"row": row, "trains": ROWS[row][0], **{k: v for k, v in ROWS[row][1].items()},
                  "precision": trainer.accelerator.mixed_precision, "device": str(trainer.accelerator.device),
                  "trained_parameters": trained, "setup_s": round(setup, 1),
                  "step_s": [round(s, 1) for s in seconds],
                  "peak_gib": round(peak / GIB, 3),
                  "weights_gib": round(weights / GIB, 3),
                  "estimate_gib": round(estimate.total / GIB, 3),
                  "estimate_vs_measured": round(estimate.total / peak, 3),
                  "estimate_parts_gib": {k: round(v / GIB, 3) for k, v in estimate.parts.items()},
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)}
        trainer.stream.close()
        return result


# ---- what a row needs, before running it ----------------------------------------------------------------

def estimate_before(folder: Path, row: str, device: str, size: int = 512) -> float:
    """difflab.memory's estimate for `row` from the folder's parameter counts (before loading anything)."""
    from difflab.memory import ModelShape, estimate_training

    trains, flags = ROWS[row]
    precision = half_type(device) if flags.get("precision") == "half" else "no"
    return estimate_training(ModelShape.of_folder(folder), height=size, width=size, batch=2, lora=trains == "lora",
                             checkpointing=bool(flags.get("gradient_checkpointing")),
                             optimizer=flags.get("optimizer", "adamw"), precision=precision,
                             train_text_encoder=trains == "unet+te").total


def run_rows(folder: Path, rows: list[str], device: str, steps: int, max_gib: float, size: int = 512) -> list[dict]:
    """Each row in a fresh process (its peak memory its own), or skipped above `max_gib` with its estimate."""
    results = []
    for row in rows:
        estimate = estimate_before(folder, row, device, size) / GIB
        if device == "cpu" and estimate > max_gib:
            results.append({"row": row, "skipped": f"estimated peak {estimate:.1f} GiB is above --max-gib {max_gib:g}",
                            "estimate_gib": round(estimate, 1)})
            continue
        command = [sys.executable, __file__, "--row", row, "--folder", str(folder), "--device", device,
                   "--steps", str(steps), "--image-size", str(size)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            results.append({"row": row, "failed": (done.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def main() -> None:
    from difflab.memory import available_memory

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="SD 1.5's layout at a fraction of its width (a check)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=1, help="training steps per row")
    parser.add_argument("--rows", help="comma-separated, of: " + ", ".join(ROWS) + f" (default on the CPU: "
                        f"{', '.join(CPU_ROWS)}; on a GPU: all)")
    parser.add_argument("--max-gib", type=float, default=(available_memory() or 0) / GIB - 1.5,
                        help="skip CPU rows estimated above this (default: available memory less 1.5 GiB)")
    parser.add_argument("--image-size", type=int, default=None, help="default 512 (64 with --tiny)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # one row, in this process (what run_rows starts)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    size = args.image_size or (64 if args.tiny else 512)
    if args.row:
        print(json.dumps(run_row(args.folder, args.row, args.device, args.steps, size)))
        return
    started = time.perf_counter()
    folder = build("sd15", args.tiny)
    built = time.perf_counter() - started
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else \
        list(CPU_ROWS if args.device == "cpu" else ROWS)
    emit({"benchmark": "real_scale_train", "model": "SD 1.5 architecture, random weights" + (" (tiny)" * args.tiny),
          "image_size": size, "images_per_step": 2, "prior_preservation": True, "folder_build_s": round(built, 1),
          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
          "rows": run_rows(folder, rows, args.device, args.steps, args.max_gib, size)})


if __name__ == "__main__":
    main()
