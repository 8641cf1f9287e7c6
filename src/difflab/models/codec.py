"""The latent codec of a latent diffusion model: a diffusers VAE and its latent scaling factor.

The diffusion model works on `encode(images)` = scaling_factor · (a sample of the VAE's posterior),
which has roughly unit variance; `decode` inverts it. Each image draws its posterior sample from
its own generator, so an image does not depend on the others in its batch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class LatentCodec:
    def __init__(self, vae):
        self.vae = vae
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        # Each block but the last halves the image (diffusers' `vae_scale_factor`, AutoencoderTiny too).
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = vae.config.latent_channels

    execution_device: torch.device | None = None  # set by models/offload.py

    @property
    def device(self) -> torch.device:
        return self.execution_device or next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode(self, images: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Images in [-1, 1] [B, C, H, W] -> scaled latents [B, c, H/f, W/f]; image i samples the
        posterior with generators[i] (diffusers' order: one image at a time)."""
        images = images.to(self.device, self.dtype)
        if generators is None:
            latents = _latents(self.vae.encode(images), None)
        else:
            latents = torch.cat([_latents(self.vae.encode(images[i:i + 1]), g) for i, g in enumerate(generators)])
        return latents * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in about [-1, 1]. Several images decode one at a time, and an image
        too large for the device's free memory in tiles (diffusers' VAE slicing and tiling, chosen by
        difflab.memory.vae_plan): at 512 px one image's decoding holds about 1 GB in fp32, a batch holds
        that for each image."""
        from difflab.memory import decode_bytes, free_memory, vae_plan

        channels = self.vae.config.block_out_channels
        one_image = decode_bytes(latents.shape[-2] * self.factor, latents.shape[-1] * self.factor,
                                 channels[min(1, len(channels) - 1)], torch.finfo(self.dtype).bits // 8)
        slicing, tiling = vae_plan(latents.shape[0], one_image, free_memory(self.device))
        with vae_modes(self.vae, slicing, tiling):
            return self.vae.decode(latents.to(self.dtype) / self.scaling_factor).sample


@contextmanager
def vae_modes(vae, slicing: bool, tiling: bool):
    """The VAE decoding sliced and/or tiled for the duration, as it was afterwards."""
    saved = {name: getattr(vae, name) for name in ("use_slicing", "use_tiling") if hasattr(vae, name)}
    if "use_slicing" in saved:
        vae.use_slicing = slicing
    if "use_tiling" in saved:
        vae.use_tiling = tiling
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)


def _latents(encoded, generator):
    """A posterior sample (AutoencoderKL) or the latents themselves (AutoencoderTiny)."""
    if hasattr(encoded, "latent_dist"):
        return encoded.latent_dist.sample(generator)
    return encoded.latents


@torch.no_grad()
def round_trip(codec, images: torch.Tensor, seed: int, chunk: int = 256) -> torch.Tensor:
    """Images in [-1, 1] through the VAE and back (posterior samples seeded by `seed`), on the CPU in
    [-1, 1]: what a latent model can draw of them at best."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rebuilt = [codec.decode(codec.encode(part)).float().cpu() for part in images.split(chunk)]
    return torch.cat(rebuilt).clamp(-1, 1)
