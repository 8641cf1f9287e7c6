"""What a training loop reports while it runs: the figures on its progress bar, a clear stop when
the loss is no longer a number, and (optionally) TensorBoard or wandb. Shared by the real trainer and
the teaching loop (`difflab scratch train`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.config import to_dict
from difflab.errors import ConfigError, TrainingError


def finite_losses(losses: list[torch.Tensor], last_step: int, advice: Callable[[], str],
                  names: tuple[str, ...] = ("the loss",)) -> torch.Tensor:
    """The losses of the steps up to `last_step` as a CPU tensor. Each step's entry is its loss, or a
    tensor of the figures `names` describes (loss first, then e.g. the gradients' norm). If a figure
    is not finite, stop before a diverged model is logged or saved: a TrainingError names the figure
    and its step, then says `advice()`."""
    values = torch.stack(losses).float().cpu().reshape(len(losses), -1) if losses else torch.zeros(0, len(names))
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        row, column = bad[0].tolist()
        step = last_step - len(values) + row + 1
        raise TrainingError(f"{names[column]} became {values[row, column].item()} at step {step} and training "
                            f"stopped; {advice()}")
    return values[:, 0]


def show_progress(bar, loss: float, images_per_s: float, *, step: int, fraction_done: float,
                  step_budget: int | None) -> None:
    """Loss and images/s on the bar. Without a step budget (minutes or epochs), the bar's length is
    estimated from how much of the budget is used."""
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", refresh=False)
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
