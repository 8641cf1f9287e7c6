"""Guidance: wrappers around the model function that change what it predicts.

A wrapper takes a model function `(x_t, t) -> prediction` and returns another, so guidance methods
compose with each other and with every sampler without the sampling loop knowing about them.
"""

from __future__ import annotations

import torch

from difflab.diffusion.sampling import ModelFn


def classifier_free_guidance(denoiser, class_labels: torch.Tensor, scale: float) -> ModelFn:
    """pred = pred(x, ∅) + scale · (pred(x, class) − pred(x, ∅)), both from one batched forward pass.
    Scale 1 is plain conditional sampling (one pass), 0 unconditional, above 1 sharper classes.
    Mixing predictions linearly is the same for ε, v and x₀ targets, since each is affine in ε."""
    if scale == 1.0:
        return lambda x, t: denoiser(x, t, class_labels)
    both = torch.cat([class_labels, torch.full_like(class_labels, denoiser.null_class)])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = denoiser(torch.cat([x, x]), t, both).chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return guided
