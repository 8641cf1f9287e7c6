"""Conversions between what a network predicts (epsilon, v or x0) and the clean-image estimate x̂₀.

In the variance-preserving form x_t = √ᾱ·x₀ + √(1-ᾱ)·ε, with v = √ᾱ·ε − √(1-ᾱ)·x₀.
Samplers, x̂₀ clipping and guidance all go through these two functions.
"""

from __future__ import annotations

import torch


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ᾱ at (possibly fractional) timesteps t, linearly interpolated."""
    t = torch.as_tensor(t, dtype=torch.float32).clamp(0, len(alphas_cumprod) - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=len(alphas_cumprod) - 1)
    w = (t - low).to(alphas_cumprod.dtype)
    return alphas_cumprod[low] * (1 - w) + alphas_cumprod[high] * w


def to_x0(prediction: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, kind: str) -> torch.Tensor:
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if kind == "epsilon":
        return (x_t - s * prediction) / a
    if kind == "v_prediction":
        return a * x_t - s * prediction
    return prediction


def from_x0(x0: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, kind: str) -> torch.Tensor:
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if kind == "epsilon":
        return (x_t - a * x0) / s
    if kind == "v_prediction":
        return (a * x_t - x0) / s
    return x0
