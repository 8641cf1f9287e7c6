"""The network every sampler and the trainer call.

`Denoiser(x_t, t, class_labels)` returns the model's prediction (epsilon, v or x0, as its noise
schedule says). It wraps a diffusers UNet; conditioning enters through one of the UNet's doors,
declared here rather than hand-wired into each loop:

- extra input channels: a learned class embedding broadcast over the image and concatenated to
  x_t (the course's class-conditioned MNIST model; `class_method="channels"`);
- an embedding added to the timestep embedding: diffusers' own `num_class_embeds`
  (`class_method="embedding"`);
- cross-attention on a sequence (text), for the Stable Diffusion family.

Class-conditional models have one extra class, the null class (index `num_classes`), that stands
for "no label": training drops labels to it so the same network also predicts unconditionally,
which classifier-free guidance needs.
"""

from __future__ import annotations

import torch
from torch import nn

CLASS_METHODS = ("embedding", "channels")


class Denoiser(nn.Module):
    def __init__(self, unet: nn.Module, num_classes: int | None = None, class_method: str | None = None,
                 class_embed_dim: int = 4):
        super().__init__()
        self.unet = unet
        self.num_classes = num_classes
        self.class_method = class_method if num_classes else None
        if self.class_method == "channels":
            self.class_embedding = nn.Embedding(num_classes + 1, class_embed_dim)

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.class_method is None:
            return self.unet(x, t).sample
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), self.null_class, device=x.device, dtype=torch.long)
        if self.class_method == "channels":
            maps = self.class_embedding(class_labels)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
            return self.unet(torch.cat([x, maps.to(x.dtype)], dim=1), t).sample
        return self.unet(x, t, class_labels=class_labels).sample

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Weights outside the UNet (saved beside the diffusers folders)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("unet.")}
