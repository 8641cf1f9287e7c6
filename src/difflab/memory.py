"""Peak memory of a job on its device, estimated before it starts, from the model's parameter counts,
the image size, the batch and the flags — so that a run that cannot fit is refused in a second with the
flags that would make it fit, not after minutes of loading with an out-of-memory error.

One function per job: `estimate_sampling` (difflab sample, the demo) and `estimate_training`
(DreamBooth, fine-tuning, text-to-image training). `check_fits` compares an estimate with the device's
free memory and refuses with the remedies. The working-memory constants were measured on Stable
Diffusion 1.5's components at 256 and 512 px on the CPU (docs/real-scale.md) and are checked against
whole runs by bench/real_scale.py.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from difflab.errors import ConfigError

GB = 1e9
# An estimate is said from 1 GB: below it the job fits any device difflab runs on (a 4 GB GPU, a laptop), so
# the line would only be noise on small and test runs; Stable Diffusion estimates 3-18 GB.
SAY_MEMORY_FROM = 1 * GB
HALF = ("fp16", "bf16")

# Working memory, in "full tensors" of the activation that dominates it, measured on SD 1.5's components
# on the CPU in fp32 (allocator growth during one call; docs/real-scale.md): a UNet forward without
# gradients holds UNET_FIXED plus about UNET_TENSORS tensors of batch × latent pixels × the first level's
# channels (274 MiB at batch 2, 64×64 latents; 130 MiB at 32×32) — attention runs through PyTorch's SDPA,
# which never holds the N×N matrix; the VAE decoder about DECODE_TENSORS tensors of images × pixels ×
# its second level's channels, the level upsampled to full resolution (963 MiB for one 512 px image,
# 243 MiB at 256 px).
UNET_FIXED = 82 * 2**20
UNET_TENSORS = 18.8
DECODE_TENSORS = 3.76
# Training, per sample at 64×64 latents and 320 first-level channels, fp32 (the measurement on
# SD 1.5: 1.74 GiB of saved activations for one forward; 0.29 GiB with gradient checkpointing).
TRAIN_ACTIVATIONS = 1.74 * 2**30
TRAIN_ACTIVATIONS_CHECKPOINTED = 0.29 * 2**30
# The backward pass allocates the gradients as it frees the activations it has used: when the gradients
# are all there, this share of the activations is still held (the down blocks' at full resolution). Measured
# on SD 1.5 at 512 px, 2 images, fp32 AdamW on the CPU (bench/real_scale_train.py): 14.65 GiB at the
# second step = weights 3.97 + AdamW state 6.40 + 4.28 GiB, with 3.20 GiB of gradients and 3.48 of activations.
ACTIVATIONS_HELD_WITH_GRADIENTS = 0.3
# Optimizer state per trained parameter, bytes: AdamW's two fp32 moments; bitsandbytes' 8-bit AdamW's
# two 8-bit moments (+ block scales); transformers' Adafactor's second moment factored over each weight's
# last two dimensions — for a 3×3 convolution that is two thirds of its weights, so on SD 1.5's UNet 2.13
# bytes per weight (1.70 GiB; measured peak 9.34 GiB against 9.37 with 8-bit AdamW, bench/real_scale_train.py).
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.1, "adafactor": 2.13}
LORA_FRACTION = 0.004  # a rank-4 LoRA on SD 1.5's attention: 3.2 M of 860 M parameters
# The flags a refusal names must make the run fit with room to spare: the estimates are within 10% of the
# measured peaks (docs/real-scale.md), so a remedy leaves that much of the free memory unused.
REMEDY_HEADROOM = 0.9


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need to know of a model: parameters per network and a few widths."""

    unet: int
    text_encoder: int = 0
    vae: int = 0
    unet_channels: int = 320  # the UNet's first level
    vae_channels: int = 256  # the VAE decoder's full-resolution input level (block_out_channels[1])
    latent_factor: int = 1  # 8 for Stable Diffusion, 1 for pixel models
    vae_tile: int = 512  # the VAE's sample_size: the side of a tile when decoding in tiles

    @classmethod
    def of_model(cls, model) -> ModelShape:
        """The shape of a loaded DiffusionModel."""
        def count(module):
            return sum(p.numel() for p in module.parameters()) if module is not None else 0

        vae = model.codec.vae if model.codec is not None else None
        channels = list(vae.config.block_out_channels) if vae is not None else [0]
        tile = vae.config.sample_size if vae is not None else 512
        text = model.prompts.text_encoder if model.prompts is not None else None
        return cls(unet=count(model.denoiser), text_encoder=count(text), vae=count(vae),
                   unet_channels=model.unet.config.block_out_channels[0],
                   vae_channels=channels[min(1, len(channels) - 1)],
                   latent_factor=model.codec.factor if model.codec is not None else 1,
                   vae_tile=tile if isinstance(tile, int) else tile[0])

    @classmethod
    def of_folder(cls, folder: str | Path) -> ModelShape:
        """The shape of a Stable Diffusion folder, read from its configs and safetensors headers."""
        from safetensors import safe_open

        folder = Path(folder)

        def count(part):
            total = 0
            for path in (folder / part).glob("*.safetensors"):
                with safe_open(str(path), framework="pt") as f:
                    total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
            return total

        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        channels = vae["block_out_channels"]
        tile = vae.get("sample_size", 512)
        return cls(unet=count("unet"), text_encoder=count("text_encoder"), vae=count("vae"),
                   unet_channels=unet["block_out_channels"][0], vae_channels=channels[min(1, len(channels) - 1)],
                   latent_factor=2 ** (len(channels) - 1), vae_tile=tile if isinstance(tile, int) else tile[0])


@dataclass
class Estimate:
    """An estimated peak in bytes, as the parts that make it up (what is held at the peak)."""

    job: str
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        shown = ", ".join(f"{name} {_gb(size)}" for name, size in self.parts.items() if size >= 0.005 * GB)
        return f"about {_gb(self.total)}" + (f" ({shown})" if shown else "")


def weight_bytes(precision: str) -> int:
    return 2 if precision in HALF else 4


def decode_bytes(height: int, width: int, channels: int, bytes_per_value: int) -> float:
    """Working memory of decoding one image of height × width (see DECODE_TENSORS)."""
    return DECODE_TENSORS * height * width * channels * bytes_per_value


def vae_plan(images: int, one_image: float, free: float | None) -> tuple[bool, bool]:
    """(slicing, tiling) as chosen automatically: decode one image at a time whenever there are several
    (the same images within float rounding, a fraction of the memory); decode in tiles (blended at
    their seams, as diffusers' enable_vae_tiling does: the image changes a little) only when decoding one
    image (`one_image` bytes) would take more than half of the `free` memory — a large image on a small GPU."""
    return images > 1, free is not None and one_image > free / 2


def estimate_sampling(shape: ModelShape, *, height: int, width: int, batch: int = 1, cfg: bool = True,
                      precision: str = "no", offload: bool = False, vae_slicing: bool | None = None,
                      vae_tiling: bool | None = None, free: float | None = None) -> Estimate:
    """Peak memory of sampling `batch` images of height × width: the weights (half-size in fp16/bf16,
    which are loaded as such), and the larger of the UNet's working memory (twice the batch under
    classifier-free guidance) and the decoder's. With `offload` only one network is on the device at a
    time (the peak of the largest one and its work). VAE slicing and tiling: as chosen for `free` bytes
    (see vae_plan), unless given."""
    wb = weight_bytes(precision)
    job = f"sampling {batch} image{'s' * (batch > 1)} of {width}×{height}"
    auto_slicing, auto_tiling = vae_plan(batch, decode_bytes(height, width, shape.vae_channels, wb), free)
    slicing = auto_slicing if vae_slicing is None else vae_slicing
    tiling = auto_tiling if vae_tiling is None else vae_tiling
    f = shape.latent_factor
    unet_work = (UNET_FIXED * wb / 4
                 + UNET_TENSORS * batch * (2 if cfg else 1) * (height // f) * (width // f) * shape.unet_channels * wb)
    decoded = 1 if slicing else batch
    tile_area = min(height, shape.vae_tile) * min(width, shape.vae_tile) if tiling else height * width
    decode_work = decoded * decode_bytes(1, tile_area, shape.vae_channels, wb) if shape.vae else 0
    weights = {"UNet": shape.unet * wb, "text encoder": shape.text_encoder * wb, "VAE": shape.vae * wb}
    if offload:  # the text encoder, the UNet and the VAE take turns on the device
        stages = {"UNet": unet_work, "VAE": decode_work, "text encoder": 0.0}
        on_device = max(stages, key=lambda name: weights[name] + stages[name])
        return Estimate(job, {f"{on_device} weights": weights[on_device],
                                     f"{on_device} working": stages[on_device]})
    work = {"UNet working": unet_work} if unet_work >= decode_work else {"decoding": decode_work}
    return Estimate(job, {"weights": sum(weights.values()), **work})


def estimate_training(shape: ModelShape, *, height: int, width: int, batch: int = 1, lora: bool = False,
                      checkpointing: bool = False, optimizer: str = "adamw", precision: str = "no",
                      train_text_encoder: bool = False, prior_preservation: bool = False) -> Estimate:
    """Peak memory of a training step of the UNet (and the text encoder when trained), as diffusers'
    DreamBooth scripts hold it, from the second step on (when the optimizer state exists): trained
    weights in fp32 with their gradients and optimizer state; frozen networks in the half type under
    fp16/bf16; autocast's half copies of trained weights; activations saved for the backward pass (a
    fraction with gradient checkpointing), of which a share is freed before the gradients are all
    there. Prior preservation doubles the batch (instance + class images)."""
    if optimizer not in OPTIMIZER_BYTES:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose {', '.join(OPTIMIZER_BYTES)}")
    half = precision in HALF
    samples = batch * (2 if prior_preservation else 1)
    latent_pixels = (height // shape.latent_factor) * (width // shape.latent_factor)
    scale = samples * latent_pixels / 64 ** 2 * shape.unet_channels / 320 * (0.6 if half else 1.0)
    trained = shape.unet * (LORA_FRACTION if lora else 1.0)
    frozen_bytes = weight_bytes(precision)
    activations = (TRAIN_ACTIVATIONS_CHECKPOINTED if checkpointing else TRAIN_ACTIVATIONS) * scale
    gradients = trained * 4
    parts = {
        "UNet weights": shape.unet * (frozen_bytes if lora else 4) + (trained * 4 if lora else 0),
        "gradients": gradients,
        "optimizer state": trained * OPTIMIZER_BYTES[optimizer],
        # what the forward pass saved and the backward pass still holds at the peak (ACTIVATIONS_HELD_...)
        "activations": max(activations - gradients, ACTIVATIONS_HELD_WITH_GRADIENTS * activations),
    }
    if half and not lora:  # autocast keeps half copies of the fp32 weights it runs (convolutions, linears)
        parts["autocast copies"] = 0.8 * shape.unet * 2
    if train_text_encoder:
        text_trained = shape.text_encoder * (LORA_FRACTION if lora else 1.0)
        parts["text encoder"] = (shape.text_encoder * (frozen_bytes if lora else 4) + text_trained * 4
                                 + text_trained * OPTIMIZER_BYTES[optimizer])
    else:
        parts["text encoder"] = shape.text_encoder * frozen_bytes
    parts["VAE"] = shape.vae * frozen_bytes
    return Estimate("training", parts)


def training_remedies(shape: ModelShape, free: float, lora_flag: str = "--lora", **flags) -> list[str]:
    """The flags, added one by one in the order diffusers' scripts suggest them, after which the
    training estimate fits in `free` bytes (empty if nothing listed makes it fit). `lora_flag`: how the
    command asks for LoRA (dreambooth --lora; train and finetune --lora-rank N)."""
    steps = [("--gradient-checkpointing", {"checkpointing": True}),
             ("--optimizer adamw8bit", {"optimizer": "adamw8bit"}),
             ("--precision fp16", {"precision": "fp16"}), (lora_flag, {"lora": True})]
    return first_fitting(steps, flags, lambda changed: estimate_training(shape, **changed).total, free)


def sampling_remedies(shape: ModelShape, free: float, on_gpu: bool, **flags) -> list[str]:
    """As training_remedies, for sampling: half precision, offload (GPUs only), a smaller batch."""
    steps = [("--precision fp16", {"precision": "fp16"})] + ([("--offload", {"offload": True})] if on_gpu else [])
    steps.append(("--batch-size 1", {"batch": 1}))
    return first_fitting(steps, flags, lambda changed: estimate_sampling(shape, **changed).total, free)


def first_fitting(steps: list[tuple[str, dict]], flags: dict, total, free: float) -> list[str]:
    """The flags of `steps` (each a flag and the settings it changes), added one by one to `flags` until
    the estimate `total(settings)` fits in `free` bytes with REMEDY_HEADROOM to spare; empty if even all of
    them do not make it fit. Steps already in `flags` are skipped."""
    chosen, current = [], dict(flags)
    for flag, change in steps:
        if all(current.get(k) == v for k, v in change.items()):
            continue
        current.update(change)
        chosen.append(flag)
        if total(current) <= free * REMEDY_HEADROOM:
            return chosen
    return []


def check_training_memory(shape: ModelShape, device, *, yes: bool, lora_flag: str = "--lora", **flags) -> str:
    """For the trainer, one call at its start: the training estimate (`flags` as estimate_training takes
    them) in words, or ConfigError (unless `yes`) naming the flags that would make it fit on `device`."""
    estimate = estimate_training(shape, **flags)
    free = free_memory(device)
    remedies = (training_remedies(shape, free, lora_flag, **flags)
                if free is not None and estimate.total > free else [])
    return check_fits(estimate, device, yes=yes, remedies=remedies, free=free)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable counts reclaimable caches),
    or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_memory(device) -> float | None:
    """Bytes free for new allocations on `device`: the GPU's free memory, or the machine's available
    memory for the CPU; None where unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    if device.type == "cpu":
        free = available_memory()
        return float(free) if free is not None else None
    return None


def check_fits(estimate: Estimate, device, *, yes: bool, remedies: list[str], free: float | None = None) -> str:
    """The estimate in words (for the log); ConfigError, unless `yes`, when it exceeds the device's free
    memory: one line with the estimate, what is free, and the flags that would make it fit."""
    import torch

    free = free_memory(device) if free is None else free
    where = torch.device(device).type
    said = f"estimated peak memory of {estimate.job} on {where}: {estimate.describe()}"
    if free is None or estimate.total <= free or yes:
        return said + (f"; {_gb(free)} available" if free is not None else "")
    fix = (f"add {' '.join(remedies)}" if remedies else "use a smaller size or batch, or a larger device")
    raise ConfigError(f"{said}, and {_gb(free)} is available on {where}: {fix}, or pass --yes to try anyway")


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.0f} MB"


# ---- measured, for the benchmarks and tests that check these estimates on the CPU ----------------------

def allocated_bytes() -> int:
    """Bytes the C allocator has handed out now (glibc's mallinfo2: heap in use + mmapped blocks). Unlike
    the resident set, it does not depend on whether freed memory was given back to the system."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def peak_growth(fn, every: float = 0.001) -> int:
    """The largest growth of the memory this process has allocated while `fn` runs, in bytes (sampled every
    `every` seconds by a thread)."""
    import threading
    import time

    base, peak, running = allocated_bytes(), [0], [True]

    def watch():
        while running[0]:
            peak[0] = max(peak[0], allocated_bytes() - base)
            time.sleep(every)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fn()
    finally:
        running[0] = False
        watcher.join()
    return peak[0]
