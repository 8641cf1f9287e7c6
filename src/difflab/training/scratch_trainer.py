"""`difflab scratch train`: the teaching model's own training loop (`difflab.scratch.train`), run
with the real trainer's run folder, progress bar, metrics and sample grids:

    runs/NAME/config.toml   metrics.csv   loss.png   samples/   model/

The teaching loop is kept as the course wrote it (Adam at a constant rate, no moving average), and
the teaching model trains in minutes, so there are no checkpoints and no --resume. difflab's data
is in [-1, 1]; the course's corruption mixes images in [0, 1] with noise in [0, 1), so batches
are moved to [0, 1] here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from difflab.config import ScratchConfig
from difflab.data import BatchStream, open_dataset
from difflab.devices import pick_device
from difflab.images import make_grid
from difflab.models.scratch import train
from difflab.models.scratch_model import ScratchInfo, ScratchModel, check_scratch_image_size
from difflab.progress import progress_bar
from difflab.training.budget import Budget
from difflab.training.reporting import show_progress
from difflab.training.run_folder import MetricsLog, RunFolder
from difflab.training.signals import stop_if_signalled, stop_signals
from difflab.training.steps import StepLog, StepStats, TrainState


class ScratchTrainer:
    """Set up like the real trainer (settings and data, run folder, model, batch stream and noise, the
    bookkeeping of steps); `clock` (seconds) measures training time, and tests inject one."""

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
        self.stream = BatchStream(data, config.optim.batch_size, seed=config.run.seed, flip=d.flip)
        self.noise_rng = torch.Generator().manual_seed(config.run.seed * 7919)
        self.steps = StepLog(Budget.from_config(config.run), config.optim.batch_size, clock)
        self.metrics = MetricsLog(self.run.metrics)

    @property
    def state(self) -> TrainState:
        return self.steps.state

    def fraction_done(self) -> float:
        return self.steps.fraction_done(self.stream.epochs_done)

    # ---- the loop: difflab.scratch.train, fed and watched from here ----------------------------------
    def fit(self, after_step: Callable[[TrainState], None] | None = None) -> Path:
        """Train until the budget is used, then write the last grid and the model. `after_step(state)`
        runs after each step and what it writes; a KeyboardInterrupt there (or Ctrl-C) keeps the model."""
        self.bar = progress_bar(total=self.steps.budget.steps, unit="step", desc="training (BasicUNet)")

        def on_step(step: int, loss: torch.Tensor) -> None:
            self.count_step(loss)
            if after_step is not None:
                after_step(self.state)

        try:
            with self.bar:
                train(self.model.net, self.batches(), lr=self.config.optim.lr, generator=self.noise_rng,
                      on_step=on_step)
        except KeyboardInterrupt:
            self.save_model()  # keep what was learnt: the run cannot be resumed, but its model can be sampled
            raise
        self.write_samples()
        return self.save_model()

    def batches(self) -> Iterator[torch.Tensor]:
        """Training images in [0, 1] on the device, until the budget is used."""
        while self.fraction_done() < 1.0:
            self.steps.start_step()
            images = next(self.stream)["images"]
            yield ((images + 1) / 2).to(self.device)

    def count_step(self, loss: torch.Tensor) -> None:
        """The step the teaching loop just took: counted, then its metrics row and grid if due."""
        self.steps.end_step(StepStats(loss=loss))
        self.bar.update()
        run, step, finished = self.config.run, self.state.step, self.fraction_done() >= 1.0
        if step % run.log_every == 0 or finished:
            self.log()
        if run.sample_every and step % run.sample_every == 0 and not finished:
            self.write_samples()
        stop_if_signalled(last=finished)  # SIGTERM/SIGHUP: stop here, through the Ctrl-C path in fit

    # ---- what the loop writes ----------------------------------------------------------------------
    def log(self) -> None:
        lr = self.config.optim.lr
        row = self.steps.row(self.stream.epochs_done, lr,
                             lambda: f"lower --lr (now {lr}) and run again with --overwrite")
        show_progress(self.bar, row["loss"], row["images_per_s"], step=self.state.step,
                      fraction_done=self.fraction_done(), step_budget=self.steps.budget.steps)
        self.metrics.append(row)

    def write_samples(self) -> None:
        run = self.config.run
        images = self.model.generate(run.sample_count, run.sample_steps, seed=0)
        settings = {"step": self.state.step, "sampler": "naive", "steps": run.sample_steps, "seed": 0}
        self.run.save_samples(make_grid(images), self.state.step, settings, self.metrics)

    def save_model(self) -> Path:
        self.model.info.training.update(steps=self.state.step, images_seen=self.state.images_seen,
                                        minutes=round(self.state.seconds / 60, 2), device=str(self.device))
        return self.model.save(self.run.model)


@stop_signals()  # SIGTERM and SIGHUP save the model, like Ctrl-C
def train_scratch(config: ScratchConfig, out: str | Path, *, overwrite: bool = False) -> Path:
    """Train the teaching model; returns the folder of the saved model."""
    return ScratchTrainer(config, out, overwrite=overwrite).fit()
