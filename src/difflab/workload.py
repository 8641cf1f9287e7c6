"""How long and how much memory a generation will take, said before it starts.

`-n 100000000` on a CPU would run for weeks, and its images would not fit in memory anyway. Before
generating, the images' memory is compared with what the machine has (refused if it does not fit),
and a large request times one forward pass of the network and refuses to start a run estimated at
more than an hour unless the user says `--yes`.
"""

from __future__ import annotations

import math
import os
import time

import torch

from difflab.errors import ConfigError
from difflab.images import MIN_GRID_CELL

TIMED_FROM = 20_000  # image-steps (images × steps); smaller requests take seconds, and are not timed
ASK_BEYOND_SECONDS = 3600.0


def check_workload(model, count: int, steps: int, batch_size: int, *, yes: bool, sampler: str = "",
                   guided: bool = False, what: str = "-n", height: int | None = None, width: int | None = None,
                   offload: bool = False) -> None:
    """Refuse a generation whose images would not fit in memory, and, without `yes`, one estimated to
    take more than an hour (said with the estimate and what to do), or a latent model's sampling whose
    estimated peak memory exceeds what its device has free (difflab.memory). `guided`: two network
    passes per step (classifier-free guidance)."""
    if model.codec is not None:
        check_sampling_memory(model, min(batch_size, count), height or model.info.image_size,
                              width or model.info.image_size, guided=guided, offload=offload, yes=yes)
    info = model.info
    cell = info.image_size * max(1, MIN_GRID_CELL // info.image_size) + 2  # as images.make_grid draws it
    image_bytes = info.channels * info.image_size ** 2 * 4 + cell ** 2 * 3  # float32 results, and the RGB grid
    need, free = count * image_bytes, available_memory()
    if free is not None and need > free:
        fits = max(1, free // (2 * image_bytes))
        raise ConfigError(f"{what} {count} images of {info.image_size}×{info.image_size} would take "
                          f"{_size(need)} of memory and {_size(free)} is available; generate at most about "
                          f"{fits:,} at a time (--seed S starts at image S, so runs can continue one another)")
    if yes or count * steps < TIMED_FROM:
        return
    batch = min(batch_size, count)
    seconds = math.ceil(count / batch) * steps * _seconds_per_call(model, batch) * (2 if guided else 1)
    if sampler == "heun":
        seconds *= 2  # two network calls per step
    if seconds > ASK_BEYOND_SECONDS:
        raise ConfigError(f"{what} {count} images × {steps} steps would take about {_duration(seconds)} on "
                          f"{model.device.type} (measured here); lower {what} or --steps, or pass --yes to start "
                          "anyway")


def check_sampling_memory(model, batch: int, height: int, width: int, *, guided: bool, offload: bool,
                          yes: bool) -> None:
    """Log the estimated peak memory of sampling a batch on the model's device; refuse (unless `yes`)
    when what it needs beyond the weights already there exceeds the device's free memory, naming the
    flags that would make it fit."""
    import logging

    from difflab.memory import ModelShape, check_fits, estimate_sampling, free_memory, sampling_remedies

    shape = ModelShape.of_model(model)
    flags = dict(height=height, width=width, batch=batch, cfg=guided, offload=offload,
                 precision="no" if model.dtype == torch.float32 else "fp16")
    estimate = estimate_sampling(shape, **flags)
    device = model.device
    free = free_memory(device)
    resident = 0 if offload else sum(p.numel() * p.element_size() for part in model.modules()
                                     for p in part.parameters() if p.device.type == device.type)
    room = None if free is None else free + resident  # the loaded weights are part of the estimate
    remedies = (sampling_remedies(shape, room, device.type == "cuda", **flags)
                if room is not None and estimate.total > room else [])
    logging.getLogger("difflab").info(check_fits(estimate, device, yes=yes, remedies=remedies, free=room))


def _seconds_per_call(model, batch: int) -> float:
    """One forward pass of the network on a batch, timed after a warm-up call."""
    device = model.device
    x = torch.zeros((batch, *model.sample_shape(model.info.image_size, model.info.image_size)), device=device)
    t = torch.full((batch,), 1, device=device, dtype=torch.long)
    conditioning = stand_in_conditioning(model, x)
    with torch.no_grad():
        model.denoiser(x, t, conditioning)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        model.denoiser(x, t, conditioning)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - started


def stand_in_conditioning(model, x: torch.Tensor):
    """Zeros of the shapes the model's doors take (a class, prompt embeddings, extra channels), for timing."""
    from difflab.models.conditioning import Conditioning

    batch, device = x.shape[0], x.device
    parts = {}
    if model.denoiser.num_classes:
        parts["labels"] = torch.zeros(batch, dtype=torch.long, device=device)
    if model.prompts is not None:
        width = model.prompts.text_encoder.config.hidden_size
        parts["text"] = torch.zeros(batch, model.prompts.max_tokens, width, device=device)
    if model.codec is not None and model.kind.extra_channels(model.codec.channels):
        parts["channels"] = torch.zeros(batch, model.kind.extra_channels(model.codec.channels), *x.shape[-2:],
                                        device=device)
    if model.variant == "upscale":
        parts["noise_level"] = torch.zeros(batch, dtype=torch.long, device=device)
    return Conditioning(**parts)


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


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    for unit, length in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f} {unit}"
    return f"{seconds:.0f} seconds"
