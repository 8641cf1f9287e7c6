"""The one training loop.

Unconditional, conditioned and fine-tuning runs are all this loop: a batch stream, a denoiser, a
noise schedule and the parameters to train. Built on `accelerate`, so
`accelerate launch -m difflab train ...` runs the same code on several GPUs or machines.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab import testhooks
from difflab.config import TrainConfig, dumps_config
from difflab.data import BatchStream, ImageDataset, open_dataset
from difflab.diffusion.generate import generate
from difflab.errors import TrainingError
from difflab.images import make_grid, save_png
from difflab.models.build import build_model
from difflab.pipelines.card import model_card
from difflab.pipelines.folder import save_model
from difflab.plots import loss_curve
from difflab.training import checkpoints
from difflab.training.budget import Budget, lr_factor
from difflab.training.losses import diffusion_loss, min_snr_weights, prediction_target
from difflab.training.run_folder import MetricsLog, RunFolder

log = logging.getLogger("difflab")


@dataclass
class TrainState:
    step: int = 0
    images_seen: int = 0
    seconds: float = 0.0  # time spent training; sample grids are not counted


def resolve_data_settings(config: TrainConfig, data: ImageDataset) -> TrainConfig:
    """Fill in what was left to the data (image size, channels), so the saved config is complete."""
    return dataclasses.replace(config, data=dataclasses.replace(
        config.data, image_size=data.image_size, channels=data.channels))


def mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


class Trainer:
    def __init__(self, config: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False):
        from accelerate import Accelerator
        from diffusers.training_utils import EMAModel

        config.validate()
        self.accelerator = acc = Accelerator(cpu=config.run.device == "cpu",
                                             mixed_precision=mixed_precision(config.optim.precision))
        d = config.data
        data = open_dataset(d.spec, d.image_size, d.channels, d.split, d.strict, d.memory_limit_mb)
        self.config = config = resolve_data_settings(config, data)
        self.run = RunFolder(out)
        checkpoint = self.run.prepare(config, resume=resume, overwrite=overwrite, write=acc.is_main_process,
                                      barrier=acc.wait_for_everyone)
        acc.wait_for_everyone()

        self.model = build_model(config.model, data.image_size, data.channels, data.source, config.run.seed)
        self.model.info.training = {"preset": config.model.preset, "images": len(data)}
        denoiser = self.model.denoiser.to(acc.device)
        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        self.ema = EMAModel(self.params, decay=config.optim.ema_decay, foreach=True) if config.optim.ema_decay else None
        self.stream = BatchStream(data, config.optim.batch_size, seed=config.run.seed, flip=d.flip,
                                  rank=acc.process_index, world_size=acc.num_processes)
        self.noise_rng = torch.Generator().manual_seed(config.run.seed * 7919 + acc.process_index)
        self.state = TrainState()
        self.lr = 0.0  # the learning rate of the latest step
        self.budget = Budget.from_config(config.run)
        self.metrics = MetricsLog(self.run.metrics)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
        self.denoiser, self.optimizer = acc.prepare(denoiser, self.optimizer)

    @property
    def images_per_step(self) -> int:
        o = self.config.optim
        return o.batch_size * o.grad_accum * self.accelerator.num_processes

    def fraction_done(self) -> float:
        return self.budget.fraction(self.state.step, self.stream.epochs_done, self.state.seconds)

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self) -> Path:
        run = self.config.run
        main = self.accelerator.is_main_process
        bar = tqdm(total=self.budget.steps, initial=self.state.step, unit="step", desc="training",
                   disable=not main, dynamic_ncols=True)
        losses: list[torch.Tensor] = []  # since the last log row, kept on the device
        window_start, window_seconds = self.state.step, 0.0
        try:
            while self.fraction_done() < 1.0:
                started = time.perf_counter()
                losses.append(self.train_step())
                self.state.step += 1
                self.state.images_seen += self.images_per_step
                elapsed = time.perf_counter() - started
                self.state.seconds += elapsed
                window_seconds += elapsed
                step, finished = self.state.step, self.fraction_done() >= 1.0
                bar.update()
                if step % run.log_every == 0 or finished:
                    images_per_s = (step - window_start) * self.images_per_step / max(window_seconds, 1e-9)
                    self.log(losses, images_per_s, bar)
                    losses, window_start, window_seconds = [], step, 0.0
                if run.checkpoint_every and step % run.checkpoint_every == 0 and not finished:
                    self.save_checkpoint(losses)
                if run.sample_every and step % run.sample_every == 0 and not finished:
                    self.write_samples()
        except KeyboardInterrupt:
            bar.close()
            self.save_checkpoint(losses)
            raise
        bar.close()
        self.save_checkpoint(losses)
        self.write_samples()
        return self.save_model()

    def train_step(self) -> torch.Tensor:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss and the gradients'
        norm (on the device, checked by `check_finite`)."""
        o, acc = self.config.optim, self.accelerator
        schedule = self.model.noise_schedule
        total = torch.zeros((), device=acc.device)
        for micro in range(o.grad_accum):
            x0 = next(self.stream)["images"].to(acc.device, non_blocking=True)
            noise = torch.randn(x0.shape, generator=self.noise_rng).to(acc.device)
            t = torch.randint(0, schedule.config.num_train_timesteps, (x0.shape[0],), generator=self.noise_rng)
            t = t.to(acc.device)
            x_t = schedule.add_noise(x0, noise, t)
            last = micro == o.grad_accum - 1
            with nullcontext() if last else acc.no_sync(self.denoiser):
                with acc.autocast():
                    prediction = self.denoiser(x_t, t)
                weights = min_snr_weights(schedule, t, o.min_snr_gamma) if o.min_snr_gamma else None
                loss = diffusion_loss(prediction, prediction_target(schedule, x0, noise, t), weights)
                acc.backward(loss / o.grad_accum)
            total += loss.detach() / o.grad_accum
        grad_norm = self.gradient_norm(o.clip_grad)
        self.lr = o.lr * lr_factor(self.state.step, self.fraction_done(), o.warmup_steps, o.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        return torch.stack([total, grad_norm])

    def gradient_norm(self, clip: float) -> torch.Tensor:
        """The gradients' total norm, after clipping it to `clip` if that is set. With fp16 loss scaling
        an overflow is routine (the scaler skips that step), so it is not reported: zero is returned."""
        acc = self.accelerator
        norm = acc.clip_grad_norm_(self.params, clip) if clip else None
        if acc.scaler is not None:
            return torch.zeros((), device=acc.device)
        if norm is None:
            grads = [p.grad.detach() for p in self.params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else None
        return torch.zeros((), device=acc.device) if norm is None else norm.detach().float()

    # ---- what the loop writes ----------------------------------------------------------------------
    def check_finite(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """Stop before a diverged model is logged or saved, naming the step where it went wrong.
        `losses` holds train_step's (loss, gradient norm) pairs; returns the losses."""
        values = torch.stack(losses).float().cpu() if losses else torch.zeros(0, 2)
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            row, column = bad[0].tolist()
            step = self.state.step - len(values) + row + 1
            what = ("the loss", "the gradients' norm")[column]
            o = self.config.optim
            raise TrainingError(
                f"{what} became {values[row, column].item()} at step {step} and training stopped; "
                f"{checkpoints.last_good(self.run.checkpoints)}: lower --lr (now {o.lr}), lengthen --warmup-steps "
                f"or set --clip-grad, then run again with --resume"
            )
        return values[:, 0]

    def log(self, losses: list[torch.Tensor], images_per_s: float, bar) -> None:
        values = self.check_finite(losses)
        loss = values.mean().item()
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", refresh=False)
        if self.budget.steps is None and self.fraction_done() > 0:
            bar.total = max(self.state.step, round(self.state.step / self.fraction_done()))
            bar.refresh()
        if self.accelerator.is_main_process:
            with self.writing(self.run.metrics):
                self.metrics.append({
                    "step": self.state.step, "epoch": round(self.stream.epochs_done, 4), "loss": loss, "lr": self.lr,
                    "images_per_s": images_per_s, "seconds": round(self.state.seconds, 2),
                })

    @contextmanager
    def writing(self, path: Path):
        """A failed write (a full disk, a read-only folder) stops training with one line that says what
        to do; checkpoints.save_checkpoint reports its own."""
        try:
            yield
        except OSError as e:
            raise TrainingError(
                f"could not write {path} ({e.strerror or e}); {checkpoints.last_good(self.run.checkpoints)}: "
                "free some disk space or make the run folder writable, then run again with --resume"
            ) from None

    @contextmanager
    def ema_weights(self):
        """Swap the moving-average weights in (for samples and the saved model), then back."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def write_samples(self) -> None:
        if not self.accelerator.is_main_process:
            return
        run = self.config.run
        with self.ema_weights():
            images = generate(self.model, run.sample_count, sampler=run.sample_sampler, steps=run.sample_steps, seed=0)
        self.model.denoiser.train()
        settings = {"step": self.state.step, "sampler": run.sample_sampler, "steps": run.sample_steps, "seed": 0}
        grid = self.run.samples / f"step_{self.state.step:06d}.png"
        with self.writing(grid):
            save_png(make_grid(images), grid, settings)
        steps, values = self.metrics.series("loss")
        if values:
            with self.writing(self.run.loss_plot):
                loss_curve(steps, values, self.run.loss_plot)

    def save_checkpoint(self, pending_losses: list[torch.Tensor]) -> None:
        from accelerate.utils import gather_object

        self.check_finite(pending_losses)
        noise_states = gather_object([self.noise_rng.get_state()])
        if not self.accelerator.is_main_process:
            return
        optimizer_tensors, optimizer_meta = checkpoints.flatten_optimizer(self.optimizer.state_dict())
        tensors = {
            "model": self.model.denoiser.state_dict(),
            "optimizer": optimizer_tensors,
            "rng": {f"noise.{rank}": state for rank, state in enumerate(noise_states)},
        }
        if self.ema is not None:
            tensors["ema"] = {str(i): p for i, p in enumerate(self.ema.shadow_params)}
        state = {
            "train": dataclasses.asdict(self.state),
            "data": self.stream.state_dict(),
            "optimizer": optimizer_meta,
            "ema_step": self.ema.optimization_step if self.ema is not None else 0,
        }
        checkpoints.save_checkpoint(self.run.checkpoints, self.state.step, tensors, state, self.config.run.keep_checkpoints)

    def load_checkpoint(self, path: Path) -> None:
        tensors, state = checkpoints.load_checkpoint(path)
        self.model.denoiser.load_state_dict(tensors["model"])
        self.optimizer.load_state_dict(checkpoints.unflatten_optimizer(tensors["optimizer"], state["optimizer"]))
        if self.ema is not None and "ema" in tensors:
            device = self.accelerator.device
            self.ema.shadow_params = [tensors["ema"][str(i)].to(device) for i in range(len(self.params))]
            self.ema.optimization_step = state["ema_step"]
        noise_state = tensors["rng"].get(f"noise.{self.accelerator.process_index}")
        if noise_state is not None:
            self.noise_rng.set_state(noise_state)
        self.stream.load_state_dict(state["data"])
        self.state = TrainState(**state["train"])
        if self.accelerator.is_main_process:
            self.metrics.truncate_after(self.state.step)
        log.info("resuming from %s (step %d)", path, self.state.step)

    def save_model(self) -> Path:
        if self.accelerator.is_main_process:
            self.model.info.training.update(
                steps=self.state.step, images_seen=self.state.images_seen, minutes=round(self.state.seconds / 60, 2),
                device=str(self.accelerator.device), ema_decay=self.config.optim.ema_decay)
            with self.ema_weights(), self.writing(self.run.model):
                card = model_card(self.model, str(self.run.model), dumps_config(self.config))
                save_model(self.model, self.run.model, card)
        self.accelerator.wait_for_everyone()
        return self.run.model


def train(config: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train a model; returns the folder of the saved model."""
    testhooks.watch_writes(out)
    trainer = Trainer(config, out, resume=resume, overwrite=overwrite)
    try:
        model_dir = trainer.fit()
    finally:
        trainer.stream.close()  # stops the processes that read a large folder ahead
    testhooks.report(trainer)
    return model_dir
