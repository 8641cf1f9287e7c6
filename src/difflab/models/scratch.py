"""Diffusion models from scratch: the teaching implementation of course unit 1, in plain PyTorch.

Read it top to bottom. The first half is the course's toy model: corrupt images by mixing them with
noise, train a small UNet to predict the clean image, then sample by repeatedly moving towards the
prediction. The second half is DDPM itself in a few lines each: the β schedule and ᾱ, the forward
process q(x_t | x_0), and one step of ancestral sampling from the posterior q(x_{t-1} | x_t, x̂_0).

Everything here has a real counterpart (see docs/from-scratch.md), and the DDPM part is checked
against diffusers' `DDPMScheduler` in tests/test_scratch.py. Randomness comes from explicit CPU
generators, so the same seed gives the same numbers on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import ConfigError

# ---- 1. Corruption: mix the images with noise ------------------------------------------------------------


def corrupt(x: torch.Tensor, amount, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mix images in [0, 1] with uniform noise in [0, 1): `x * (1 - amount) + noise * amount`.
    `amount` is a number, or one number per image (0 = the image, 1 = pure noise)."""
    noise = torch.rand(x.shape, generator=generator).to(x.device, x.dtype)
    amount = torch.as_tensor(amount, dtype=x.dtype, device=x.device)
    if amount.ndim == 1:
        amount = amount.view(-1, 1, 1, 1)  # one amount per image, broadcast over its pixels
    return x * (1 - amount) + noise * amount


# ---- 2. The network: a minimal UNet --------------------------------------------------------------------


class BasicUNet(nn.Module):
    """Three 5×5 convolutions down (channels 32, 64, 64), three up, SiLU after each, max-pooling and
    upsampling between them, and skip connections that *add* the down path's features to the up
    path's. 309,057 parameters for one channel. The image side must divide by 4."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1):
        super().__init__()
        self.down_layers = nn.ModuleList([
            nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.Conv2d(64, 64, kernel_size=5, padding=2),
        ])
        self.up_layers = nn.ModuleList([
            nn.Conv2d(64, 64, kernel_size=5, padding=2),
            nn.Conv2d(64, 32, kernel_size=5, padding=2),
            nn.Conv2d(32, out_channels, kernel_size=5, padding=2),
        ])
        self.act = nn.SiLU()
        self.downscale = nn.MaxPool2d(2)
        self.upscale = nn.Upsample(scale_factor=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, layer in enumerate(self.down_layers):
            x = self.act(layer(x))
            if i < 2:  # all but the lowest resolution: keep for the skip, then halve the image
                skips.append(x)
                x = self.downscale(x)
        for i, layer in enumerate(self.up_layers):
            if i > 0:  # all but the lowest resolution: double the image, then add the skip
                x = self.upscale(x) + skips.pop()
            x = self.act(layer(x))  # the course applies SiLU after the last layer too
        return x


# ---- 3. Training: predict the clean image from a corrupted one ------------------------------------------


def train(net: nn.Module, batches: Iterable[torch.Tensor], *, lr: float = 1e-3,
          generator: torch.Generator | None = None,
          on_step: Callable[[int, torch.Tensor], None] | None = None) -> list[float]:
    """The course's training loop. For each batch of images in [0, 1]: corrupt every image by a random
    amount, ask the network for the clean image, and minimise the mean squared error (x₀-prediction).
    Runs until `batches` ends; returns the loss of every step. `on_step(step, loss)` is for logging."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for step, x in enumerate(batches, start=1):
        loss = train_step(net, optimizer, x, generator)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, loss)
    return losses


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One step of the course's loop on a batch `x` in [0, 1]; returns the loss (detached, on the device).
    `difflab scratch train` runs these steps in difflab's one training loop."""
    amount = torch.rand(x.shape[0], generator=generator)
    prediction = net(corrupt(x, amount, generator))
    loss = F.mse_loss(prediction, x)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---- 4. Sampling: walk from noise towards the prediction --------------------------------------------------


@torch.no_grad()
def sample(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, steps: int) -> torch.Tensor:
    """The course's naive sampler. From `x`, uniform noise in [0, 1), take `steps` steps; at step i
    predict the clean image and move 1/(steps - i) of the way to it, so the last step lands on it."""
    for i in range(steps):
        prediction = net(x)
        mix = 1 / (steps - i)
        x = x * (1 - mix) + prediction * mix
    return x


# ---- 5. DDPM: the noise schedule and the forward process --------------------------------------------------


def beta_schedule(name: str = "linear", timesteps: int = 1000) -> torch.Tensor:
    """β_t, the variance of the noise added at each step t = 0 … T-1.
    linear: 1e-4 to 0.02 (Ho et al., 2020). cosine: the β that make ᾱ_t = cos²((t/T + s)/(1 + s) · π/2)
    with s = 0.008, each capped at 0.999 (Nichol & Dhariwal, 2021)."""
    if name == "linear":
        return torch.linspace(1e-4, 0.02, timesteps)
    if name == "cosine":
        t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999).float()
    raise ConfigError(f"unknown noise schedule {name!r}; choose linear or cosine")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s ≤ t} (1 - β_s): how much of the image is left at step t."""
    return torch.cumprod(1 - betas, dim=0)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) in one go: x_t = √ᾱ_t · x_0 + √(1 - ᾱ_t) · ε, with ε ~ N(0, I) given
    as `noise`."""
    a = alpha_bar[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# ---- 6. DDPM: one step back, and the sampling loop ------------------------------------------------------


def ddpm_step(eps: torch.Tensor, t: int, x_t: torch.Tensor, alpha_bar: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """x_{t-1} from x_t and the predicted noise ε̂: estimate x̂_0, then sample the posterior
    q(x_{t-1} | x_t, x̂_0) = N(μ, σ²) (Ho et al., 2020, eqs. 6-7 and 15). At t = 0, σ² = 0."""
    a_t = alpha_bar[t]
    a_prev = alpha_bar[t - 1] if t > 0 else torch.tensor(1.0)
    alpha_t = a_t / a_prev  # this step's own α_t = 1 - β_t
    beta_t = 1 - alpha_t
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * x0 + (alpha_t.sqrt() * (1 - a_prev) / (1 - a_t)) * x_t
    variance = beta_t * (1 - a_prev) / (1 - a_t)
    return mean + variance.sqrt() * noise


@torch.no_grad()
def ddpm_sample(eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...],
                betas: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral sampling: start from pure noise x_T and take every step t = T-1 … 0 back."""
    alpha_bar = alphas_cumprod(betas)
    x = torch.randn(shape, generator=generator)
    for t in reversed(range(len(betas))):
        eps = eps_model(x, torch.full((shape[0],), t))
        noise = torch.randn(shape, generator=generator) if t > 0 else torch.zeros(shape)
        x = ddpm_step(eps, t, x, alpha_bar, noise)
    return x
