"""Generate images from a difflab model: seeds, batching, conditioning, progress, and the one
sampling loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from difflab.diffusion.guidance import GuidanceTerm, classifier_free_guidance, loss_guidance
from difflab.diffusion.samplers import DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS, UNCLIPPED, make_sampler
from difflab.diffusion.sampling import ModelFn, clip_x0, denoise, image_generators, initial_noise, to_unit_range
from difflab.models.model import DiffusionModel
from difflab.progress import progress_bar


def row_labels(num_classes: int, per_row: int) -> torch.Tensor:
    """Labels for a grid with one row per class: 0,0,...,1,1,...."""
    return torch.arange(num_classes).repeat_interleave(per_row)


def model_function(model: DiffusionModel, class_labels: torch.Tensor | None, cfg_scale: float) -> ModelFn:
    """The model as a function of (x_t, t), conditioned on `class_labels` with guidance if given."""
    if class_labels is None:
        return lambda x, t: model.denoiser(x, t)
    return classifier_free_guidance(model.denoiser, class_labels, cfg_scale)


def counted(model_fn: ModelFn, bar) -> ModelFn:
    """`model_fn`, ticking the progress bar at each call."""
    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bar.update()
        return model_fn(x_t, t)

    return fn


@torch.no_grad()
def generate(model: DiffusionModel, count: int, *, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
             seed: int = 0, eta: float | None = None, class_labels: torch.Tensor | None = None,
             cfg_scale: float = DEFAULT_CFG_SCALE, guidance: Sequence[GuidanceTerm] = (), guidance_mode: str = "fast",
             batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """`count` images as a float tensor [count, C, H, W] in [0, 1] on the CPU.
    Image i depends only on (seed + i, its class label, sampler, steps, cfg_scale, guidance), not on
    `batch_size`. `class_labels` (one per image) conditions a class-conditional model; without them it
    samples unconditionally. `guidance` terms steer every image (see diffusion/guidance.py), with the
    gradient through x̂₀ only (`guidance_mode="fast"`) or through the network too ("full")."""
    info, device = model.info, model.device
    model.denoiser.eval()
    scheduler = make_sampler(sampler, model.noise_schedule.config)
    scheduler.set_timesteps(steps)
    bar = progress_bar(total=-(-count // batch_size) * len(scheduler.timesteps), desc=f"sampling ({sampler})",
                       enabled=progress, leave=False)
    out = []
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        labels = None if class_labels is None else class_labels[start:start + n].to(device)
        model_fn = counted(model_function(model, labels, cfg_scale), bar)
        model_fn = loss_guidance(model_fn, guidance, model.noise_schedule, scheduler.timesteps, guidance_mode)
        if sampler in UNCLIPPED:
            model_fn = clip_x0(model_fn, model.noise_schedule)
        generators = image_generators(seed, n, start)
        x = initial_noise((n, info.channels, info.image_size, info.image_size), generators, device)
        x = denoise(model_fn, scheduler, x, steps, generators=generators, eta=eta)
        out.append(to_unit_range(x).float().cpu())
    bar.close()
    return torch.cat(out)
