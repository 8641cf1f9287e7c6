"""One DreamBooth training step at Stable Diffusion 1.5's real size, with each memory feature on and off.

A Stable Diffusion 1.5 folder is built from SD 1.5's architecture with random weights (UNet2DConditionModel
320/640/1280/1280 with cross-attention 768, CLIP ViT-L/14's text encoder, SD's AutoencoderKL; no
pretrained weights reach this machine) and cached. Each row is a fresh process that builds difflab's one
Trainer for `difflab dreambooth` on it (prior preservation on, one instance and one class image at 512 px,
2 images a step: diffusers' `--train_batch_size 1` with prior preservation) and times its training steps:

- what trains: LoRA (rank 4), the full UNet, the full UNet and the text encoder;
- memory features: --gradient-checkpointing, --optimizer adamw8bit / adafactor, --precision bf16 / fp16
  (the frozen VAE, text encoder and LoRA base held in the half type).

Peak memory: on the CPU the process's peak resident memory (lifetime, and sampled during the steps); on a
GPU torch.cuda.max_memory_allocated over the steps. A row whose estimated peak is above --max-gib is
skipped and says so.

    python bench/real_scale_train.py --tiny                  # a scaled-down check (seconds)
    OMP_NUM_THREADS=1 python bench/real_scale_train.py --folder /tmp/sd15   # real size, CPU (tens of minutes)
    python bench/real_scale_train.py --device cuda --folder /tmp/sd15

`bench/real_scale.py` calls `build_sd15_folder` and `run_rows`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

GIB = 1 << 30
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"
# name: (what trains, flags). "off" is plain fp32 AdamW; each later row adds features.
ROWS = {
    "lora": ("lora", {}),
    "lora+ckpt": ("lora", {"gradient_checkpointing": True}),
    "lora+ckpt+half": ("lora", {"gradient_checkpointing": True, "precision": "half"}),
    "unet": ("unet", {}),
    "unet+ckpt+8bit": ("unet", {"gradient_checkpointing": True, "optimizer": "adamw8bit"}),
    "unet+ckpt+8bit+half": ("unet", {"gradient_checkpointing": True, "optimizer": "adamw8bit", "precision": "half"}),
    "unet+ckpt+adafactor+half": ("unet", {"gradient_checkpointing": True, "optimizer": "adafactor",
                                          "precision": "half"}),
    "unet+te": ("unet+te", {}),
    "unet+te+ckpt+8bit+half": ("unet+te", {"gradient_checkpointing": True, "optimizer": "adamw8bit",
                                           "precision": "half"}),
}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 0.1}  # per trained parameter


# ---- the folder ----------------------------------------------------------------------------------------

def sd15_parts(tiny: bool) -> dict:
    """SD 1.5's UNet, text encoder and VAE configs (random weights); `tiny`: the same layout, narrow."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    width = 64 if tiny else 768
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1 if tiny else 2,
        block_out_channels=(32, 64, 64, 64) if tiny else (320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2 if tiny else 12,
        num_attention_heads=2 if tiny else 12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1 if tiny else 2,
                        block_out_channels=[32, 32, 64, 64] if tiny else [128, 256, 512, 512],
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        norm_num_groups=32, sample_size=512)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, prediction_type="epsilon", steps_offset=1)
    return {"unet": unet, "text_encoder": text, "vae": vae, "scheduler": scheduler}


def letter_tokenizer(folder: Path):
    """A CLIPTokenizer of single letters with CLIP's 77 tokens (CLIP's own vocabulary is not on this machine;
    the text encoder's cost does not depend on which ids it reads)."""
    import string

    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build_sd15_folder(folder: str | Path, tiny: bool = False) -> Path:
    """A StableDiffusionPipeline folder of SD 1.5's architecture with random weights (kept: built once)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as vocabulary:
        pipe = StableDiffusionPipeline(tokenizer=letter_tokenizer(Path(vocabulary)), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **sd15_parts(tiny))
    partial = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(partial, safe_serialization=True)
    partial.rename(folder)
    return folder


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


class PeakRss:
    """The process's resident memory, sampled every 20 ms while it runs (the CPU has no allocator peak)."""

    def __init__(self):
        import psutil

        self.process, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run_row(folder: Path, row: str, device: str, steps: int, size: int = 512) -> dict:
    """Build the Trainer for `row` and time `steps` training steps (what `difflab dreambooth` runs)."""
    from difflab.training import dreambooth as db
    from difflab.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        trainer = Trainer(row_config(folder, scratch / "images", row, device, steps, size), scratch / "run",
                          data=db.make_data)
        setup = time.perf_counter() - started
        cuda = trainer.accelerator.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        with PeakRss() as rss:
            for _ in range(steps):
                start = time.perf_counter()
                trainer.loop.steps.start_step()
                trainer.loop.steps.end_step(trainer.train_step(trainer.batches.next_step()))
                float(trainer.loop.steps.state.step)
                if cuda:
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)
        trained = sum(p.numel() for p in trainer.params)
        result = {"row": row, "trains": ROWS[row][0], **{k: v for k, v in ROWS[row][1].items()},
                  "precision": trainer.accelerator.mixed_precision, "device": str(trainer.accelerator.device),
                  "trained_parameters": trained, "setup_s": round(setup, 1),
                  "step_s": [round(s, 1) for s in seconds],
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2),
                  "steps_peak_rss_gib": round(rss.peak / GIB, 2)}
        if cuda:
            result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        trainer.stream.close()
        return result


# ---- what a row needs, before running it ----------------------------------------------------------------

def estimate_gib(folder: Path, row: str) -> float:
    """A rough peak for a fp32 row on the CPU from the parameter counts: every weight, and per trained weight
    its gradient and optimizer state; activations of a 512 px step of 2 images (3.5 GiB, 0.6 with
    checkpointing), and 1.5 GiB of the process itself. Used only to skip rows that cannot fit."""
    from safetensors import safe_open

    def count(part: str) -> int:
        with safe_open(str(next((folder / part).glob("*.safetensors"))), "pt") as f:
            return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())

    unet, text, vae = count("unet"), count("text_encoder"), count("vae")
    trains, flags = ROWS[row]
    trained = {"lora": 0.8e6, "unet": unet, "unet+te": unet + text}[trains]
    state = OPTIMIZER_STATE_BYTES[flags.get("optimizer", "adamw")]
    activations = 0.6 if flags.get("gradient_checkpointing") else 3.5
    return (4 * (unet + text + vae) + (4 + state) * trained) / GIB + activations + 1.5


def run_rows(folder: Path, rows: list[str], device: str, steps: int, max_gib: float) -> list[dict]:
    """Each row in a fresh process (its peak memory its own), or skipped above `max_gib` with its estimate."""
    results = []
    for row in rows:
        estimate = estimate_gib(folder, row)
        if device == "cpu" and estimate > max_gib:
            results.append({"row": row, "skipped": f"estimated peak {estimate:.1f} GiB is above --max-gib {max_gib:g}",
                            "estimate_gib": round(estimate, 1)})
            continue
        command = [sys.executable, __file__, "--row", row, "--folder", str(folder), "--device", device,
                   "--steps", str(steps)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            results.append({"row": row, "failed": (done.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        results.append({**json.loads(done.stdout.strip().splitlines()[-1]), "estimate_gib": round(estimate, 1)})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=None, help="where SD 1.5's folder is (built if missing)")
    parser.add_argument("--tiny", action="store_true", help="SD 1.5's layout at a fraction of its width (a check)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=1, help="training steps per row")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated: " + ", ".join(ROWS))
    parser.add_argument("--max-gib", type=float, default=12.0, help="skip CPU rows estimated above this")
    parser.add_argument("--image-size", type=int, default=512, help=argparse.SUPPRESS)  # tests: a smaller one
    parser.add_argument("--row", help=argparse.SUPPRESS)  # one row, in this process (what run_rows starts)
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.gettempdir()) / ("difflab-sd15-tiny" if args.tiny else "difflab-sd15")
    if args.row:
        print(json.dumps(run_row(folder, args.row, args.device, args.steps, args.image_size)))
        return
    started = time.perf_counter()
    build_sd15_folder(folder, tiny=args.tiny)
    built = time.perf_counter() - started
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    emit({"benchmark": "real_scale_train", "model": "SD 1.5 architecture, random weights" + (" (tiny)" * args.tiny),
          "image_size": 512, "images_per_step": 2, "prior_preservation": True, "folder_build_s": round(built, 1),
          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
          "rows": run_rows(folder, rows, args.device, args.steps, args.max_gib)})


if __name__ == "__main__":
    main()
