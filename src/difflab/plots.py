"""Figures: the loss curve and the noise-schedule picture."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from difflab.files import atomic_path  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as partial:
            fig.savefig(partial, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def loss_curve(steps: list[int], losses: list[float], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, color="#bbbbbb", lw=0.8, label="loss")
    if len(losses) >= 10:
        window = max(5, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="#1f77b4", lw=1.6, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def noise_figure(noised: torch.Tensor, timesteps: list[int], alphas_cumprod: torch.Tensor, schedule: str,
                 path: str | Path) -> Path:
    """Rows of images noised at `timesteps` above a plot of sqrt(alpha_bar) and sqrt(1 - alpha_bar)."""
    rows, cols = noised.shape[:2]
    fig = plt.figure(figsize=(1.3 * cols, 1.3 * rows + 2.8))
    grid = fig.add_gridspec(rows + 2, cols, height_ratios=[1] * rows + [0.25, 2.2])
    for r in range(rows):
        for c in range(cols):
            ax = fig.add_subplot(grid[r, c])
            image = noised[r, c].clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={timesteps[c]}", fontsize=8)
    ax = fig.add_subplot(grid[rows + 1, :])
    t = np.arange(len(alphas_cumprod))
    ax.plot(t, alphas_cumprod.sqrt().numpy(), label=r"$\sqrt{\bar\alpha_t}$ (signal)")
    ax.plot(t, (1 - alphas_cumprod).sqrt().numpy(), label=r"$\sqrt{1-\bar\alpha_t}$ (noise)")
    ax.set_xlabel("timestep t")
    ax.set_title(f"{schedule} schedule", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
