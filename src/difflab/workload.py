"""How long and how much memory a generation will take, said before it starts.

`-n 100000000` on a CPU would run for weeks, and its images would not fit in memory anyway. Before
generating, the images' memory is compared with what the machine has (refused if it does not fit),
and a large request times one forward pass of the network and refuses to start a run estimated at
more than an hour unless the user says `--yes`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from difflab.errors import ConfigError
from difflab.images import MIN_GRID_CELL
from difflab.memory import available_memory

log = logging.getLogger("difflab")

TIMED_FROM = 20 * 256 * 256  # pixel-steps (images × steps × pixels): smaller requests take seconds, not timed
TIMED_AT_MOST = 128 * 128  # sample positions (SD at 1024²): a larger request is timed at this size, scaled
ASK_BEYOND_SECONDS = 3600.0
SAY_BEYOND_SECONDS = 60.0


def check_workload(model, count: int, steps: int, batch_size: int, *, yes: bool, sampler: str = "",
                   guided: bool = False, what: str = "-n", size: tuple[int, int] | None = None,
                   offload: bool = False) -> None:
    """Refuse a generation whose images would not fit in memory, and, without `yes`, one estimated to
    take more than an hour (said with the estimate and what to do); one over a minute is said. `size`:
    the images' (width, height) — the requested size, or the one an input image gives (see
    diffusion/planning.py `planned_size`); default the model's own. `guided`: two network passes per
    step (classifier-free guidance). A latent model's sampling whose estimated peak memory exceeds what
    its device has free (difflab.memory) is refused too, unless `yes`; `offload`: under model CPU offload."""
    if model.codec is not None:
        w, h = size or (model.info.image_size, model.info.image_size)
        check_sampling_memory(model, min(batch_size, count), h, w, guided=guided, offload=offload, yes=yes)
    info = model.info
    width, height = size or (info.image_size, info.image_size)
    channels = 3 if model.codec is not None else info.channels
    scale = max(1, MIN_GRID_CELL // max(width, height))  # as images.make_grid draws it
    image_bytes = channels * width * height * 4 + (width * scale + 2) * (height * scale + 2) * 3  # results, grid
    need, free = count * image_bytes, available_memory()
    if free is not None and need > free:
        fits = free // (2 * image_bytes)
        advice = (f"generate at most about {fits:,} at a time (--seed S starts at image S, so runs can continue "
                  "one another)" if fits >= 1 else "ask for a smaller --width/--height (or a smaller input image)")
        raise ConfigError(f"{what} {count} images of {width}×{height} would take {_size(need)} of memory and "
                          f"{_size(free)} is available; {advice}")
    if yes or count * steps * width * height < TIMED_FROM:
        return
    batch = min(batch_size, count)
    seconds = math.ceil(count / batch) * steps * _seconds_per_call(model, batch, (width, height)) * (2 if guided else 1)
    if sampler == "heun":
        seconds *= 2  # two network calls per step
    at = f"{width}×{height} " if size else ""
    if seconds > ASK_BEYOND_SECONDS:
        raise ConfigError(f"{what} {count} images {at}× {steps} steps would take about {_duration(seconds)} on "
                          f"{model.device.type} (measured here); lower "
                          + (f"{what}, --steps or the size" if size else f"{what} or --steps")
                          + ", or pass --yes to start anyway")
    if seconds > SAY_BEYOND_SECONDS:
        log.info("%d images %s× %d steps: about %s on %s (estimated)", count, at, steps, _duration(seconds),
                 model.device.type)


def check_sampling_memory(model, batch: int, height: int, width: int, *, guided: bool, offload: bool,
                          yes: bool) -> None:
    """Log the estimated peak memory of sampling a batch on the model's device; refuse (unless `yes`)
    when what it needs beyond the weights already there exceeds the device's free memory, naming the
    flags that would make it fit."""
    import logging

    from difflab.memory import (
        SAY_MEMORY_FROM,
        ModelShape,
        check_fits,
        estimate_sampling,
        free_memory,
        sampling_remedies,
    )

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
    said = check_fits(estimate, device, yes=yes, remedies=remedies, free=room)
    if yes or estimate.total >= SAY_MEMORY_FROM:
        logging.getLogger("difflab").info(said)


def _seconds_per_call(model, batch: int, size: tuple[int, int] | None = None) -> float:
    """One forward pass of the network on a batch at `size` (width, height), timed after a warm-up call.
    A size over TIMED_AT_MOST sample positions (latent or pixel) is timed at about that many and at a
    quarter of them, and extrapolated as a·N + b·N² (convolutions grow with the positions N, attention
    with their square), so that timing never takes long itself."""
    width, height = size or (model.info.image_size, model.info.image_size)
    factor = model.size_factor
    shrink = math.sqrt(width * height / (TIMED_AT_MOST * factor * factor))
    if shrink <= 1:
        return _timed(model, batch, width, height)
    sizes = [tuple(max(factor, int(side / (shrink * k)) // factor * factor) for side in (width, height))
             for k in (1, 2)]
    (n1, t1), (n2, t2) = ((w * h, _timed(model, batch, w, h)) for w, h in sizes)
    n = width * height
    if n1 == n2:
        return t1 * n / n1
    b = max(0.0, (t1 / n1 - t2 / n2) / (n1 - n2))  # t/N = a + b·N through both points
    a = max(0.0, t1 / n1 - b * n1)
    return max(a * n + b * n * n, t1 * n / n1)


def _timed(model, batch: int, width: int, height: int) -> float:
    device = model.device
    x = torch.zeros((batch, *model.sample_shape(height, width)), device=device)
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
    if model.codec is not None:
        parts.update(model.kind.conditioning_parts(batch, model.codec.channels, x.shape[-2:], device))
    return Conditioning(**parts)


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


def seconds_per_training_step(module: torch.nn.Module, loss: Callable[[], torch.Tensor], steps: int = 3) -> float:
    """The median time of `steps` optimizer steps (forward, backward, AdamW) of `module` on the batch
    `loss` computes, after one warm-up step: what a step of a training run of it costs on this machine.
    The module's weights change; time a stand-in, not a model that is being trained."""
    optimizer = torch.optim.AdamW(module.parameters())
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[steps // 2]
