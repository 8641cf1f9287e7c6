"""The one sampling loop.

A sampler is a diffusers scheduler; the model is a plain function `model_fn(x_t, t) -> prediction`.
Everything that changes *what* is predicted (classifier-free guidance, guidance losses) wraps
`model_fn`; everything that changes *where sampling starts* (img2img strength) picks the initial
sample and step. The loop itself stays the same for every mode.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

from difflab.diffusion.predictions import alpha_bar, from_x0, to_x0

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def image_generators(seed: int, count: int, start: int = 0) -> list[torch.Generator]:
    """One CPU generator per image: image i of a request uses seed + i, whatever the batching."""
    return [torch.Generator().manual_seed(seed + start + i) for i in range(count)]


def initial_noise(shape: Sequence[int], generators: list[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(tuple(shape), generator=generators, device=torch.device(device), dtype=dtype)


def clip_x0(model_fn: ModelFn, noise_schedule) -> ModelFn:
    """Wrap `model_fn` so that the x̂₀ its prediction implies lies in [-1, 1], for samplers that
    cannot clip it themselves."""
    alphas_cumprod = noise_schedule.alphas_cumprod
    kind = noise_schedule.config.prediction_type

    def clipped(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        prediction = model_fn(x_t, t)
        abar = alpha_bar(alphas_cumprod, t.cpu()).to(x_t.device, x_t.dtype)
        x0 = to_x0(prediction, x_t, abar, kind).clamp(-1, 1)
        return from_x0(x0, x_t, abar, kind)

    return clipped


def denoise(model_fn: ModelFn, scheduler, x: torch.Tensor, steps: int, *,
            generators: list[torch.Generator] | None = None, eta: float | None = None) -> torch.Tensor:
    """Run `scheduler` for `steps` steps from the pure-noise sample `x` (unit variance)."""
    scheduler.set_timesteps(steps, device=x.device)
    x = x * scheduler.init_noise_sigma
    step_args = inspect.signature(scheduler.step).parameters
    extra = {}
    if "generator" in step_args:
        extra["generator"] = generators
    if eta is not None and "eta" in step_args:
        extra["eta"] = eta
    if "use_clipped_model_output" in step_args:
        # DDIM clips x̂₀ but by default keeps the unclipped ε for the direction to x_t: the two then
        # disagree, and the error grows with the steps (MNIST, 50 steps: Fréchet distance 25 instead
        # of 0.6). Re-deriving ε from the clipped x̂₀ (as GLIDE does) keeps them consistent.
        extra["use_clipped_model_output"] = True
    for t in scheduler.timesteps:
        prediction = model_fn(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(prediction, t, x, **extra).prev_sample
    return x


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> image space [0, 1]."""
    return (x / 2 + 0.5).clamp(0, 1)
