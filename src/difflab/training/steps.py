"""What both training loops count around each step: steps, images and training seconds; the statistics
of the steps since the last metrics row, checked before anything is logged or saved; and that row.

The real trainer and the teaching loop (`difflab scratch train`) share this bookkeeping, so their
metrics.csv rows mean the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from difflab.training.budget import Budget
from difflab.training.reporting import finite_losses


@dataclass
class TrainState:
    step: int = 0
    images_seen: int = 0
    seconds: float = 0.0  # time spent training; sample grids and evaluations are not counted


@dataclass
class StepStats:
    """What one optimizer step reports, left on the device: reading a value would wait for the step to
    finish, so they are read (and checked) once per metrics row."""

    loss: torch.Tensor
    grad_norm: torch.Tensor | None = None  # the teaching loop does not measure it
    group_loss: torch.Tensor | None = None  # with loss groups: each group's summed (unweighted) loss ...
    group_count: torch.Tensor | None = None  # ... and its number of images


class StepLog:
    """Counts each step (`start_step`/`end_step`), holds the statistics of the steps since the last
    metrics row and turns them into that row. `clock` is injectable so that budgets in minutes can be
    tested without waiting."""

    def __init__(self, budget: Budget, images_per_step: int, clock: Callable[[], float] = time.perf_counter,
                 group_names: tuple[str, ...] = ()):
        self.budget = budget
        self.group_names = group_names  # a loss_NAME column each (see data.dataset.LossGroups)
        self.images_per_step = images_per_step
        self.clock = clock
        self.state = TrainState()
        self.pending: list[StepStats] = []  # since the last metrics row
        self.window_start, self.window_seconds = 0, 0.0
        self.step_started = 0.0

    def resume(self, state: TrainState) -> None:
        self.state = state
        self.window_start = state.step

    def fraction_done(self, epochs_done: float) -> float:
        return self.budget.fraction(self.state.step, epochs_done, self.state.seconds)

    def start_step(self) -> None:
        self.step_started = self.clock()

    def end_step(self, stats: StepStats) -> None:
        elapsed = self.clock() - self.step_started
        self.state.step += 1
        self.state.images_seen += self.images_per_step
        self.state.seconds += elapsed
        self.window_seconds += elapsed
        self.pending.append(stats)

    def check_finite(self, advice: Callable[[], str]) -> torch.Tensor:
        """The pending steps' losses (CPU); a TrainingError if any statistic is not finite."""
        return finite_losses(self.pending, self.state.step, advice)

    def row(self, epochs_done: float, lr: float, advice: Callable[[], str]) -> dict:
        """The metrics row of the steps since the last one (mean loss, images/s); starts the next window."""
        loss = self.check_finite(advice).mean().item()
        steps = self.state.step - self.window_start
        images_per_s = steps * self.images_per_step / max(self.window_seconds, 1e-9)
        groups = self.group_means()
        self.pending, self.window_start, self.window_seconds = [], self.state.step, 0.0
        return {"step": self.state.step, "epoch": round(epochs_done, 4), "loss": loss, **groups, "lr": lr,
                "images_per_s": images_per_s, "seconds": round(self.state.seconds, 2)}

    def group_means(self) -> dict[str, float | str]:
        """{loss_NAME: mean loss of the group's images in the pending steps} (blank when none was drawn)."""
        stats = [s for s in self.pending if s.group_loss is not None]
        if not self.group_names or not stats:
            return {}
        sums = torch.stack([s.group_loss for s in stats]).sum(0).cpu()
        counts = torch.stack([s.group_count for s in stats]).sum(0).cpu()
        return {f"loss_{name}": (sums[i] / counts[i]).item() if counts[i] else ""
                for i, name in enumerate(self.group_names)}
