"""Where a generation starts, per mode: the starting sample, the maps that enter the UNet's extra
channels, and the optional per-step hook — the only things that differ between txt2img, img2img,
inpainting, depth-to-image and upscaling. The sampling loop is the same for all of them.

Each image draws its random numbers from its own generator, in the order diffusers' pipelines draw
them (VAE posterior sample of the image, then the starting noise, then the masked image's posterior),
so that difflab's images equal the pipelines' for the same seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from difflab.diffusion.sampling import AfterStep, initial_noise, starting_sample
from difflab.models.model import DiffusionModel


@dataclass
class Start:
    sample: torch.Tensor  # x at the first timestep of the run
    channels: torch.Tensor | None = None  # the UNet's extra input channels, for every image of the batch
    noise_level: torch.Tensor | None = None  # the upscaler's class-embedding input
    after_step: AfterStep | None = None


@dataclass
class Prepared:
    """A request's inputs as tensors at the output size (see diffusion/inputs.py)."""

    shape: tuple[int, int, int]  # what the sampler works on: (C, h, w)
    image: torch.Tensor | None = None  # [1, C, H, W] in [-1, 1]
    mask: torch.Tensor | None = None  # [1, 1, H, W] in {0, 1}
    depth: torch.Tensor | None = None  # [1, H, W]
    strength: float = 1.0
    noise_level: int | None = None


def start(model: DiffusionModel, job: Prepared, generators: list[torch.Generator], scheduler,
          timesteps: torch.Tensor) -> Start:
    """Where a batch starts, by the model's variant (models/variants.py): each owns its start below."""
    return STARTS[model.variant](model, job, generators, scheduler, timesteps)


def noised(model: DiffusionModel, job: Prepared, generators, scheduler, timesteps, clean_needed: bool = True):
    """The image's latents (None without an image, or when not needed), the starting noise and the starting
    sample: the latents noised to the first step of the run (img2img, inpainting below strength 1), else noise."""
    n = len(generators)
    clean = None
    if job.image is not None and clean_needed:
        clean = encode(model, job.image.expand(n, -1, -1, -1), generators)
    noise = initial_noise((n, *job.shape), generators, model.device)
    from_clean = clean is not None and (job.mask is None or job.strength < 1)  # inpainting at 1: pure noise
    return clean, noise, starting_sample(scheduler, noise, timesteps, clean if from_clean else None)


def plain_start(model: DiffusionModel, job: Prepared, generators, scheduler, timesteps) -> Start:
    """A plain UNet: from noise (txt2img), from the noised image (img2img), or inpainting by re-imposing the
    known region after every step."""
    clean, noise, sample = noised(model, job, generators, scheduler, timesteps)
    if job.mask is None:
        return Start(sample)
    if model.codec is not None:
        # diffusers encodes the masked image for a plain UNet too, unused: draw its posterior sample's
        # noise so that each generator stays in step with the pipeline's.
        for g in generators:
            torch.randn((1, *job.shape), generator=g)
    return Start(sample, after_step=reimpose_known_region(scheduler, clean, noise, mask_at(job, len(generators),
                                                                                          model.device)))


def inpaint_start(model: DiffusionModel, job: Prepared, generators, scheduler, timesteps) -> Start:
    """An inpainting UNet: the mask and the masked image's latents enter its extra channels."""
    _, _, sample = noised(model, job, generators, scheduler, timesteps, clean_needed=job.strength < 1)
    n = len(generators)
    masked = encode(model, (job.image * (job.mask < 0.5)).expand(n, -1, -1, -1), generators)
    return Start(sample, torch.cat([mask_at(job, n, model.device), masked], dim=1))


def depth_start(model: DiffusionModel, job: Prepared, generators, scheduler, timesteps) -> Start:
    """A depth-to-image UNet: from the noised image, with the depth map in its extra channel."""
    _, _, sample = noised(model, job, generators, scheduler, timesteps)
    return Start(sample, depth_channels(job.depth, job.shape, len(generators), model.device))


def mask_at(job: Prepared, n: int, device) -> torch.Tensor:
    """The mask at the sampler's size, for every image of the batch."""
    return F.interpolate(job.mask, size=job.shape[-2:]).to(device).expand(n, -1, -1, -1)


def encode(model: DiffusionModel, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Images [-1, 1] -> what the sampler works on (latents; pixel models: the images)."""
    if model.codec is None:
        return images.to(model.device)
    return model.codec.encode(images, generators)


def reimpose_known_region(scheduler, clean: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> AfterStep:
    """Inpainting with a plain UNet: after each step, the region outside the mask is set back to the
    known image, noised to the next step's level (RePaint's simple form, as diffusers does it)."""
    def after_step(x: torch.Tensor, i: int, timesteps: torch.Tensor) -> torch.Tensor:
        known = clean
        if i < len(timesteps) - 1:
            known = scheduler.add_noise(clean, noise, timesteps[i + 1:i + 2])
        return (1 - mask) * known + mask * x

    return after_step


def depth_channels(depth: torch.Tensor, shape, n: int, device) -> torch.Tensor:
    """The depth map at latent size, rescaled to [-1, 1] per image (as depth-to-image does)."""
    depth = F.interpolate(depth.to(device)[:, None], size=shape[-2:], mode="bicubic", align_corners=False)
    low, high = depth.amin(dim=[1, 2, 3], keepdim=True), depth.amax(dim=[1, 2, 3], keepdim=True)
    return (2.0 * (depth - low) / (high - low) - 1.0).expand(n, -1, -1, -1)


def upscale_start(model: DiffusionModel, job: Prepared, generators: list[torch.Generator], scheduler,
                  timesteps: torch.Tensor) -> Start:
    """The ×4 upscaler: the low-resolution image, noised to `noise_level` by its own scheduler, enters
    the extra channels; the level enters the class embedding; sampling starts from pure noise."""
    n, device = len(generators), model.device
    low = job.image.to(device).expand(n, -1, -1, -1)
    level = torch.tensor([job.noise_level], dtype=torch.long, device=device)
    low = model.low_res_scheduler.add_noise(low, initial_noise(low.shape, generators, device), level)
    noise = initial_noise((n, *job.shape), generators, device)
    return Start(noise * scheduler.init_noise_sigma, low, level.repeat(n))


STARTS = {None: plain_start, "inpaint": inpaint_start, "depth": depth_start, "upscale": upscale_start}
