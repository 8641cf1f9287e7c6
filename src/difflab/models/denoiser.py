"""The network every sampler and the trainer call.

`Denoiser(x_t, t, conditioning)` returns the model's prediction (epsilon, v or x0, as its noise
schedule says). It wraps a diffusers UNet (`UNet2DModel` for pixel models, `UNet2DConditionModel`
for the Stable Diffusion family); a `Conditioning` (models/conditioning.py) enters through the
UNet's doors, declared here rather than hand-wired into each loop:

- extra input channels concatenated to x_t: a learned class embedding broadcast over the image (the
  course's class-conditioned MNIST model; `class_method="channels"`), or the maps a conditioning
  carries (inpainting's mask + masked latents, a depth map, the upscaler's low-resolution image);
- an embedding added to the timestep embedding: diffusers' own `num_class_embeds`
  (`class_method="embedding"`), or the upscaler's noise level;
- cross-attention on a sequence: prompt embeddings, for the Stable Diffusion family.

Class-conditional models have one extra class, the null class (index `num_classes`), that stands
for "no label": training drops labels to it so the same network also predicts unconditionally,
which classifier-free guidance needs.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.models.conditioning import Conditioning

CLASS_METHODS = ("embedding", "channels")  # how class labels enter the UNet (config.py offers these)


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

    @property
    def takes_long_context(self) -> bool:
        """Whether the text door takes a prompt sequence of any length: diffusers' cross-attention UNet
        does (its keys and values are projected token by token), so a long prompt reaches it whole."""
        from diffusers import UNet2DConditionModel

        return isinstance(self.unet, UNet2DConditionModel)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                conditioning: Conditioning | torch.Tensor | None = None) -> torch.Tensor:
        """`conditioning` may also be a tensor of class labels (the common case in training)."""
        if conditioning is None or isinstance(conditioning, torch.Tensor):
            conditioning = Conditioning(labels=conditioning)
        # The sampler's arithmetic stays in x's type (fp32); the UNet runs in its weights' type, which is
        # fp16/bf16 when the model was loaded for half-precision sampling (no autocast copies).
        out_dtype, dtype = x.dtype, getattr(self.unet, "dtype", x.dtype)
        x = x.to(dtype)
        inputs, doors = [x], {}
        labels = conditioning.labels
        if self.class_method is not None and labels is None:
            labels = torch.full((x.shape[0],), self.null_class, device=x.device, dtype=torch.long)
        if self.class_method == "channels":
            inputs.append(self.class_embedding(labels)[:, :, None, None].expand(-1, -1, *x.shape[-2:]).to(x.dtype))
        elif self.class_method == "embedding":
            doors["class_labels"] = labels
        if conditioning.channels is not None:
            inputs.append(conditioning.channels.to(x.dtype))
        if conditioning.noise_level is not None:
            doors["class_labels"] = conditioning.noise_level
        if conditioning.text is not None:
            doors["encoder_hidden_states"] = conditioning.text.to(x.dtype)
        x = torch.cat(inputs, dim=1) if len(inputs) > 1 else x
        out = self.unet(x, t, **doors).sample
        return out.to(out_dtype) if dtype != out_dtype else out

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Weights outside the UNet (saved beside the diffusers folders)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("unet.")}
