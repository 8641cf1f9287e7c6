"""The one sampling loop.

A sampler is a diffusers scheduler; the model is a plain function `model_fn(x_t, t) -> prediction`.
Everything that changes *what* is predicted (conditioning, classifier-free guidance, guidance losses)
wraps `model_fn`; *where sampling starts* is an input (pure noise, or a clean sample noised to the
first step of a run that starts part-way down the schedule: img2img, depth-to-image); and an
optional `after_step` hook changes the sample between steps (inpainting with a plain UNet re-imposes
the known region). The loop itself stays the same for every mode, pixel or latent.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

from difflab.diffusion.predictions import alpha_bar, from_x0, to_x0

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def first_step(steps: int, strength: float) -> int:
    """The index in a `steps`-step schedule where a run of the given strength starts (diffusers'
    img2img rule: the last int(steps · strength) steps are run)."""
    return steps - min(int(steps * strength), steps)


def run_timesteps(scheduler, steps: int, strength: float = 1.0, device=None) -> torch.Tensor:
    """Set `scheduler` up for `steps` steps and return the timesteps a run of `strength` visits."""
    scheduler.set_timesteps(steps, device=device)
    begin = first_step(steps, strength) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


def starting_sample(scheduler, noise: torch.Tensor, timesteps: torch.Tensor,
                    clean: torch.Tensor | None = None) -> torch.Tensor:
    """Pure noise at the scheduler's scale, or the clean sample `clean` noised to the first timestep."""
    if clean is None:
        return noise * scheduler.init_noise_sigma
    return scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(noise)))


AfterStep = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def denoise(model_fn: ModelFn, scheduler, x: torch.Tensor, timesteps: torch.Tensor, *,
            generators: list[torch.Generator] | None = None, eta: float | None = None,
            after_step: AfterStep | None = None) -> torch.Tensor:
    """Run `scheduler` over `timesteps` (from `run_timesteps`) from the sample `x` (from
    `starting_sample`). `after_step(x, i, timesteps)` may change the sample after step i."""
    step_args = inspect.signature(scheduler.step).parameters
    extra = {}
    if "generator" in step_args:
        extra["generator"] = generators
    if eta is not None and "eta" in step_args:
        extra["eta"] = eta
    clips = scheduler.config.get("clip_sample") or scheduler.config.get("thresholding")
    if clips and "use_clipped_model_output" in step_args:
        # DDIM clips x̂₀ but by default keeps the unclipped ε for the direction to x_t: the two then
        # disagree, and the error grows with the steps (MNIST, 50 steps: Fréchet distance 25 instead
        # of 0.6). Re-deriving ε from the clipped x̂₀ (as GLIDE does) keeps them consistent.
        extra["use_clipped_model_output"] = True
    for i, t in enumerate(timesteps):
        prediction = model_fn(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(prediction, t, x, **extra).prev_sample
        if after_step is not None:
            x = after_step(x, i, timesteps)
    return x


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> image space [0, 1]."""
    return (x / 2 + 0.5).clamp(0, 1)
