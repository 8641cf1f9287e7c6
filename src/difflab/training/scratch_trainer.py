"""`difflab scratch train`: the teaching model's steps (`difflab.scratch.train_step`, the course's loop body)
run by the one training loop, with its run folder, progress bar, metrics and sample grids:

    runs/NAME/config.toml   metrics.csv   loss.png   samples/   model/

The teaching loop is kept as the course wrote it (Adam at a constant rate, no moving average), and
the teaching model trains in minutes, so there are no checkpoints and no --resume. difflab's data
is in [-1, 1]; the course's corruption mixes images in [0, 1] with noise in [0, 1), so batches
are moved to [0, 1] here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch

from difflab.config import ScratchConfig
from difflab.data import BatchStream, open_dataset
from difflab.devices import pick_device
from difflab.images import make_grid
from difflab.models.scratch import train_step
from difflab.models.scratch_model import ScratchInfo, ScratchModel, check_scratch_image_size
from difflab.training.budget import Budget
from difflab.training.loop import Cadence, Loop, Task
from difflab.training.run_folder import RunFolder
from difflab.training.signals import stop_signals
from difflab.training.steps import StepStats, TrainState


class ScratchTrainer(Task):
    """The teaching model as a task of the one loop (training/loop.py): a batch is images moved to [0, 1],
    a step is the course's (`difflab.scratch.train_step`), and there is no checkpoint (an interrupted run
    keeps its model). `clock` (seconds) measures training time, and tests inject one."""

    label = "training (BasicUNet)"

    def __init__(self, config: ScratchConfig, out: str | Path, *, overwrite: bool = False,
                 clock: Callable[[], float] = time.perf_counter):
        config.validate()
        self.device = pick_device(config.run.device)
        d = config.data
        data = open_dataset(d.spec, d.image_size, d.channels, d.split, d.strict)
        check_scratch_image_size(data.image_size)  # before anything is written
        self.config = config = dataclasses.replace(config, data=dataclasses.replace(
            d, image_size=data.image_size, channels=data.channels))  # the saved config is complete
        self.run = RunFolder(out)
        self.run.prepare(config, resume=False, overwrite=overwrite, resumable=False)

        info = ScratchInfo(data.image_size, data.channels, data.source,
                           {"images": len(data), "batch_size": config.optim.batch_size, "lr": config.optim.lr})
        self.model = ScratchModel.new(info, config.run.seed)
        self.model.net.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.net.parameters(), lr=config.optim.lr)  # the course's, constant
        self.lr = config.optim.lr
        self.stream = BatchStream(data, config.optim.batch_size, seed=config.run.seed, flip=d.flip)
        self.noise_rng = torch.Generator().manual_seed(config.run.seed * 7919)
        self.loop = Loop(self, self.run, Budget.from_config(config.run), config.optim.batch_size,
                         Cadence(config.run.log_every, sample_every=config.run.sample_every), clock=clock,
                         resumable=False)

    @property
    def state(self) -> TrainState:
        return self.loop.state

    def fit(self, after_step: Callable[[TrainState], None] | None = None) -> Path:
        """Train until the budget is used, then write the last grid and the model. `after_step(state)`
        runs after each step and what it writes; a KeyboardInterrupt there (or Ctrl-C) keeps the model."""
        self.loop.run(after_step)
        self.write_samples()
        return self.save_model()

    # ---- the task ------------------------------------------------------------------------------------
    def step(self, loop: Loop) -> StepStats:
        images = next(self.stream)["images"]
        x = ((images + 1) / 2).to(self.device)  # the course's images are in [0, 1]
        return StepStats(loss=train_step(self.model.net, self.optimizer, x, self.noise_rng))

    def advice(self) -> str:
        return f"lower --lr (now {self.config.optim.lr}) and run again with --overwrite"

    def at_grid(self, loop: Loop) -> None:
        self.write_samples()

    def interrupted(self, loop: Loop) -> None:
        self.save_model()  # keep what was learnt: the run cannot be resumed, but its model can be sampled

    # ---- what the run writes -------------------------------------------------------------------------
    def write_samples(self) -> None:
        run = self.config.run
        images = self.model.generate(run.sample_count, run.sample_steps, seed=0)
        settings = {"step": self.state.step, "sampler": "naive", "steps": run.sample_steps, "seed": 0}
        self.run.save_samples(make_grid(images), self.state.step, settings, self.loop.metrics)

    def save_model(self) -> Path:
        self.model.info.training.update(steps=self.state.step, images_seen=self.state.images_seen,
                                        minutes=round(self.state.seconds / 60, 2), device=str(self.device))
        return self.model.save(self.run.model)


@stop_signals()  # SIGTERM and SIGHUP save the model, like Ctrl-C
def train_scratch(config: ScratchConfig, out: str | Path, *, overwrite: bool = False) -> Path:
    """Train the teaching model; returns the folder of the saved model."""
    return ScratchTrainer(config, out, overwrite=overwrite).fit()
