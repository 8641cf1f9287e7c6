"""The network every sampler and the trainer call.

`Denoiser(x_t, t, ...)` returns the model's prediction (epsilon, v or x0, as its noise schedule
says). It wraps a diffusers UNet; conditioning enters through the UNet's doors (extra input
channels, an embedding added to the timestep embedding, cross-attention), declared here rather than
hand-wired into each loop.
"""

from __future__ import annotations

import torch
from torch import nn


class Denoiser(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample
