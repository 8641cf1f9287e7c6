"""The denoising loss: the network's target for each prediction type, min-SNR-γ weighting, and the
timesteps it is drawn at."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prediction_target(schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = schedule.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return schedule.get_velocity(x0, noise, t)
    return x0


def min_snr_weights(schedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-γ (Hang et al., 2023): weight min(SNR, γ) on the x0 error, rewritten for the
    network's own target (ε: divide by SNR; v: divide by SNR + 1)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(schedule, t)
    clipped = snr.clamp(max=gamma)
    kind = schedule.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def per_image_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image [B]."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.ndim)))


def group_losses(per_image: torch.Tensor, groups: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the unweighted losses, number of images) of each of `count` loss groups: what metrics.csv
    reports per group, so that the instance loss and the prior loss can be read apart."""
    sums = torch.zeros(count, device=per_image.device).index_add_(0, groups, per_image.detach().float())
    return sums, torch.bincount(groups, minlength=count).float()


def shifted_timesteps(u: torch.Tensor, shift: float, steps: int) -> torch.Tensor:
    """Timesteps from uniform draws `u` in [0, 1), moved towards high noise by `shift` (Stable Diffusion 3's
    t' = s·t / (1 + (s − 1)·t); 1 leaves them uniform): a larger latent keeps a layout readable at a
    noise level that hides it in a smaller one, so the layout is decided at higher noise."""
    t = shift * u / (1 + (shift - 1) * u)
    return (t * steps).long().clamp(max=steps - 1)
