"""Generate images from a difflab model: seeds, batching, progress, and the one sampling loop."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from difflab.diffusion.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, UNCLIPPED, make_sampler
from difflab.diffusion.sampling import clip_x0, denoise, image_generators, initial_noise, to_unit_range
from difflab.models.model import DiffusionModel


@torch.no_grad()
def generate(model: DiffusionModel, count: int, *, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
             seed: int = 0, eta: float | None = None, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """`count` images as a float tensor [count, C, H, W] in [0, 1] on the CPU.
    Image i depends only on (seed + i, sampler, steps), not on `batch_size`."""
    info, device = model.info, model.device
    model.denoiser.eval()
    scheduler = make_sampler(sampler, model.noise_schedule.config)
    scheduler.set_timesteps(steps)
    bar = tqdm(total=-(-count // batch_size) * len(scheduler.timesteps), desc=f"sampling ({sampler})",
               disable=not progress, leave=False)
    out = []
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        generators = image_generators(seed, n, start)
        x = initial_noise((n, info.channels, info.image_size, info.image_size), generators, device)

        def model_fn(x_t, t):
            bar.update()
            return model.denoiser(x_t, t)

        if sampler in UNCLIPPED:
            model_fn = clip_x0(model_fn, model.noise_schedule)
        x = denoise(model_fn, scheduler, x, steps, generators=generators, eta=eta)
        out.append(to_unit_range(x).float().cpu())
    bar.close()
    return torch.cat(out)
