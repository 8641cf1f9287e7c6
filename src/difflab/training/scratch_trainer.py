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
from collections.abc import Iterator
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
from difflab.training.reporting import finite_losses, show_progress
from difflab.training.run_folder import MetricsLog, RunFolder
from difflab.training.signals import stop_if_signalled, stop_signals


class ScratchTrainer:
    def __init__(self, config: ScratchConfig, out: str | Path, *, overwrite: bool = False):
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
        self.budget = Budget.from_config(config.run)
        self.metrics = MetricsLog(self.run.metrics)
        self.step, self.seconds = 0, 0.0  # seconds of training; sample grids are not counted
        self.losses: list[torch.Tensor] = []  # since the last metrics row
        self.window_start, self.window_seconds = 0, 0.0
        self.step_started = 0.0

    def fraction_done(self) -> float:
        return self.budget.fraction(self.step, self.stream.epochs_done, self.seconds)

    # ---- the loop: difflab.scratch.train, fed and watched from here ----------------------------------
    def fit(self) -> Path:
        self.bar = progress_bar(total=self.budget.steps, unit="step", desc="training (BasicUNet)")
        try:
            with self.bar:
                train(self.model.net, self.batches(), lr=self.config.optim.lr, generator=self.noise_rng,
                      on_step=self.on_step)
        except KeyboardInterrupt:
            self.save_model()  # keep what was learnt: the run cannot be resumed, but its model can be sampled
            raise
        self.write_samples()
        return self.save_model()

    def batches(self) -> Iterator[torch.Tensor]:
        """Training images in [0, 1] on the device, until the budget is used."""
        while self.fraction_done() < 1.0:
            self.step_started = time.perf_counter()
            images = next(self.stream)["images"]
            yield ((images + 1) / 2).to(self.device)

    def on_step(self, step: int, loss: torch.Tensor) -> None:
        elapsed = time.perf_counter() - self.step_started
        self.step, self.seconds = step, self.seconds + elapsed
        self.window_seconds += elapsed
        self.losses.append(loss)
        self.bar.update()
        finished = self.fraction_done() >= 1.0
        run = self.config.run
        if step % run.log_every == 0 or finished:
            self.log()
        if run.sample_every and step % run.sample_every == 0 and not finished:
            self.write_samples()
        stop_if_signalled(last=finished)  # SIGTERM/SIGHUP: stop here, through the Ctrl-C path in fit

    # ---- what the loop writes ----------------------------------------------------------------------
    def log(self) -> None:
        lr = self.config.optim.lr
        values = finite_losses(self.losses, self.step,
                               lambda: f"lower --lr (now {lr}) and run again with --overwrite")
        loss = values.mean().item()
        images_per_s = (self.step - self.window_start) * self.config.optim.batch_size / max(self.window_seconds, 1e-9)
        show_progress(self.bar, loss, images_per_s, step=self.step, fraction_done=self.fraction_done(),
                      step_budget=self.budget.steps)
        self.metrics.append({
            "step": self.step, "epoch": round(self.stream.epochs_done, 4), "loss": loss, "lr": lr,
            "images_per_s": images_per_s, "seconds": round(self.seconds, 2),
        })
        self.losses, self.window_start, self.window_seconds = [], self.step, 0.0

    def write_samples(self) -> None:
        run = self.config.run
        images = self.model.generate(run.sample_count, run.sample_steps, seed=0)
        settings = {"step": self.step, "sampler": "naive", "steps": run.sample_steps, "seed": 0}
        self.run.save_samples(make_grid(images), self.step, settings, self.metrics)

    def save_model(self) -> Path:
        self.model.info.training.update(steps=self.step, images_seen=self.step * self.config.optim.batch_size,
                                        minutes=round(self.seconds / 60, 2), device=str(self.device))
        return self.model.save(self.run.model)


@stop_signals()  # SIGTERM and SIGHUP save the model, like Ctrl-C
def train_scratch(config: ScratchConfig, out: str | Path, *, overwrite: bool = False) -> Path:
    """Train the teaching model; returns the folder of the saved model."""
    return ScratchTrainer(config, out, overwrite=overwrite).fit()
