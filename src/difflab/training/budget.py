"""How long a run trains: steps, epochs or minutes, whichever ends first."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_STEPS = 1000
LEAST_LEFT = 0.01  # of --minutes, for the model after an earlier stage took the rest


@dataclass
class Budget:
    steps: int | None = None
    epochs: float | None = None
    seconds: float | None = None

    @classmethod
    def from_config(cls, run, spent_seconds: float = 0.0) -> Budget:
        """The run's budget; `spent_seconds`: training time an earlier stage of the run (a text run's VAE)
        already took of --minutes, which bound the whole run. The rest is never less than LEAST_LEFT of the
        minutes, so that a stage given more than them (--vae-steps) still leaves the model a few steps."""
        if run.steps is None and run.epochs is None and run.minutes is None:
            return cls(steps=DEFAULT_STEPS)
        seconds = None if run.minutes is None else max(run.minutes * 60 - spent_seconds, LEAST_LEFT * run.minutes * 60)
        return cls(run.steps, run.epochs, seconds)

    def fraction(self, step: int, epochs: float, seconds: float) -> float:
        """How much of the budget is used, in [0, 1]: the furthest of the budgets given."""
        parts = [step / self.steps if self.steps else 0.0,
                 epochs / self.epochs if self.epochs else 0.0,
                 seconds / self.seconds if self.seconds else 0.0]
        return min(1.0, max(parts))


def lr_factor(step: int, fraction: float, warmup_steps: int, schedule: str) -> float:
    """Linear warmup over `warmup_steps`, then constant or a cosine decay to zero over the budget."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return warm
    return warm * 0.5 * (1 + math.cos(math.pi * fraction))
