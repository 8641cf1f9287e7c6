"""What conditions a batch, as one value that the denoiser dispatches to the UNet's doors.

The three doors (see models/denoiser.py):
- extra input channels, concatenated to x_t: `channels` (inpainting's mask + masked-image latents,
  a depth map, the upscaler's low-resolution image) — and class maps, built from `labels`;
- an embedding added to the timestep embedding: `labels` (class labels) or `noise_level` (the
  upscaler's), both through diffusers' `class_labels`;
- cross-attention on a sequence: `text` (prompt embeddings).

Classifier-free guidance pairs a conditioning with its "empty" twin (`unconditional`): the null
class, the negative prompt's embeddings; the channels and the noise level stay, as in diffusers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

FIELDS = ("labels", "text", "channels", "noise_level")


@dataclass
class Conditioning:
    labels: torch.Tensor | None = None       # [B] long: class labels
    text: torch.Tensor | None = None         # [B, L, D]: prompt embeddings
    channels: torch.Tensor | None = None     # [B, C, h, w]: maps concatenated to x_t
    noise_level: torch.Tensor | None = None  # [B] long: the upscaler's noise level

    def present(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in FIELDS if getattr(self, name) is not None}

    def replace(self, **changes) -> Conditioning:
        return dataclasses.replace(self, **changes)

    def map(self, fn) -> Conditioning:
        """Apply `fn` to every tensor present."""
        return self.replace(**{name: fn(value) for name, value in self.present().items()})

    def to(self, device, dtype: torch.dtype | None = None) -> Conditioning:
        """Float tensors take `dtype`; label and noise-level indices stay integers."""
        return self.map(lambda v: v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device))

    def __getitem__(self, index) -> Conditioning:
        return self.map(lambda v: v[index])

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Stack conditionings of the same kind along the batch."""
        names = parts[0].present().keys()
        if any(part.present().keys() != names for part in parts):
            raise ValueError("cannot batch conditionings of different kinds")
        return Conditioning(**{name: torch.cat([getattr(part, name) for part in parts]) for name in names})
