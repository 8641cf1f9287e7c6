"""What a training loop reports while it runs: the figures on its progress bar, a clear stop when
the loss is no longer a number, and (optionally) TensorBoard or wandb. Shared by the real trainer and
the teaching loop (`difflab scratch train`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.config import to_dict
from difflab.errors import ConfigError, TrainingError

# What each statistic of a step (training.steps.StepStats) is called in an error message, in the
# order they are checked.
STATISTICS = {"loss": "the loss", "grad_norm": "the gradients' norm"}


def finite_losses(stats: list, last_step: int, advice: Callable[[], str]) -> torch.Tensor:
    """The losses of the steps up to `last_step` as a CPU tensor, from each step's StepStats. If a
    statistic is not finite, stop before a diverged model is logged or saved: a TrainingError names
    the statistic and its step, then says `advice()`."""
    if not stats:
        return torch.zeros(0)
    names = [name for name in STATISTICS if getattr(stats[0], name) is not None]
    values = torch.stack([torch.stack([getattr(s, name).float() for name in names]) for s in stats]).cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        row, column = bad[0].tolist()
        step = last_step - len(values) + row + 1
        raise TrainingError(f"{STATISTICS[names[column]]} became {values[row, column].item()} at step {step} and "
                            f"training stopped; {advice()}")
    return values[:, 0]


def show_progress(bar, loss: float, images_per_s: float, *, step: int, fraction_done: float,
                  step_budget: int | None, **figures: float) -> None:
    """Loss, images/s and a task's own `figures` (the VAE's PSNR) on the bar. Without a step budget (minutes
    or epochs), the bar's length is estimated from how much of the budget is used."""
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", **{k: f"{v:.4g}" for k, v in figures.items()},
                    refresh=False)
    if step_budget is None and fraction_done > 0:
        bar.total = max(step, round(step / fraction_done))
        bar.refresh()


# ---- trackers (--log-with): optional, through accelerate ----------------------------------------------

TRACKER_FOLDER = "trackers"  # in the run folder: TensorBoard's event files (wandb keeps its own)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def flat_settings(config) -> dict:
    """The run's settings as {"section.name": value}, as trackers take them."""
    return {f"{section}.{name}": value for section, values in to_dict(config).items() for name, value in values.items()}


def check_tracker(name: str | None) -> None:
    """A tracker asked for is installed (difflab does not depend on any)."""
    if not name:
        return
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[name]()
    if not available:
        raise ConfigError(f"--log-with {name} needs the {TRACKER_PACKAGES[name]} package, which is not installed: "
                          f"pip install {TRACKER_PACKAGES[name]}, or leave --log-with out (metrics.csv has it all)")
