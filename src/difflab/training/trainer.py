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

from difflab import testhooks
from difflab.config import TrainConfig, dumps_config
from difflab.data import BatchStream, ImageDataset, open_dataset
from difflab.diffusion.generate import generate, row_labels
from difflab.errors import DataError, TrainingError
from difflab.images import make_grid, save_png
from difflab.models.build import build_model
from difflab.pipelines.card import model_card
from difflab.pipelines.folder import save_model
from difflab.progress import progress_bar
from difflab.training import checkpoints, finetune
from difflab.training.budget import Budget, lr_factor
from difflab.training.losses import diffusion_loss, min_snr_weights, prediction_target
from difflab.training.reporting import TRACKER_FOLDER, check_tracker, finite_losses, flat_settings, show_progress
from difflab.training.run_folder import MetricsLog, RunFolder
from difflab.training.signals import stop_if_signalled, stop_signals

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


def mixed_precision(choice: str, device: str = "auto") -> str:
    """auto: bf16 where the hardware runs it fast (recent GPUs; CPUs with AMX, where it measured twice
    as fast as fp32), fp16 on older GPUs, full precision elsewhere."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and device != "cpu":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if amx else "no"


def make_accelerator(config: TrainConfig, out: str | Path | None = None):
    """A fresh Accelerator for this run. accelerate keeps one state per process and refuses a second
    run with other settings (say, another precision); clearing its per-run part, not the distributed
    part, lets one process train several runs (a notebook, the tests). Trackers (`--log-with`) write
    under the run folder `out`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    trackers = {}
    if config.run.log_with:
        trackers = {"log_with": config.run.log_with, "project_dir": str(Path(out) / TRACKER_FOLDER)}
    return Accelerator(cpu=config.run.device == "cpu",
                       mixed_precision=mixed_precision(config.optim.precision, config.run.device), **trackers)


class Trainer:
    def __init__(self, config: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False):
        from diffusers.training_utils import EMAModel

        config.validate()
        check_tracker(config.run.log_with)
        self.accelerator = acc = make_accelerator(config, out)
        base = None
        if config.model.base:  # fine-tuning: the model decides the network, schedule, size and channels
            base = finetune.load_base(config)
            config = finetune.settings_from_base(config, base)
        d = config.data
        data = open_dataset(d.spec, d.image_size, None if base else d.channels, d.split, d.strict, d.memory_limit_mb)
        if base:
            data = finetune.fit_data(data, config)
            base = finetune.fine_tuned(base, config, data)
        conditional = config.model.conditioning == "class"
        if conditional and not base and not data.has_labels:  # fine_tuned checks a base model's
            raise DataError(f"--conditioning class needs labelled data, and {d.spec} has no labels "
                            "(put each class's images in its own sub-folder)")
        self.config = config = resolve_data_settings(config, data)
        self.run = RunFolder(out)
        checkpoint = self.run.prepare(config, resume=resume, overwrite=overwrite, write=acc.is_main_process,
                                      barrier=acc.wait_for_everyone)
        acc.wait_for_everyone()

        self.model = base or build_model(config.model, data.image_size, data.channels, data.source, config.run.seed,
                                         data.class_names if conditional else None)
        if config.run.log_with and acc.is_main_process:
            acc.init_trackers("difflab", config=flat_settings(config),
                              init_kwargs={"wandb": {"name": self.run.root.name, "dir": str(self.run.root)}})
        self.evaluator = None
        self.last_evaluation: dict | None = None
        if config.run.eval_every and acc.is_main_process:
            from difflab.metrics.evaluate import Evaluator

            self.evaluator = Evaluator.for_data(d.spec, data.image_size, data.channels)
        self.model.info.training = {"images": len(data)}
        if config.model.preset != finetune.BASE_PRESET:
            self.model.info.training["preset"] = config.model.preset
        if conditional:
            self.model.info.training["cond_dropout"] = config.model.cond_dropout
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
        bar = progress_bar(total=self.budget.steps, initial=self.state.step, unit="step", desc="training", enabled=main)
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
                if run.eval_every and step % run.eval_every == 0 and not finished:
                    self.evaluate()
                stop_if_signalled(last=finished)  # SIGTERM/SIGHUP: stop here, through the Ctrl-C path below
        except KeyboardInterrupt:
            bar.close()
            self.save_checkpoint(losses)
            raise
        bar.close()
        self.save_checkpoint(losses)
        self.write_samples()
        if run.eval_every:
            self.evaluate()
        return self.save_model()

    def train_step(self) -> torch.Tensor:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss and the gradients'
        norm (on the device, checked by `check_finite`)."""
        o, acc = self.config.optim, self.accelerator
        schedule = self.model.noise_schedule
        total = torch.zeros((), device=acc.device)
        for micro in range(o.grad_accum):
            batch = next(self.stream)
            x0 = batch["images"].to(acc.device, non_blocking=True)
            labels = self.training_labels(batch)
            noise, t = self.draw_noise(x0)
            x_t = schedule.add_noise(x0, noise, t)
            last = micro == o.grad_accum - 1
            with nullcontext() if last else acc.no_sync(self.denoiser):
                with acc.autocast():
                    prediction = self.denoiser(x_t, t, labels)
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

    def draw_noise(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian noise like `x0` and a random timestep per image, from the run's noise generator."""
        device = self.accelerator.device
        noise = torch.randn(x0.shape, generator=self.noise_rng).to(device)
        steps = self.model.noise_schedule.config.num_train_timesteps
        t = torch.randint(0, steps, (x0.shape[0],), generator=self.noise_rng).to(device)
        return noise, t

    def gradient_norm(self, clip: float) -> torch.Tensor:
        """The gradients' total norm, after clipping it to `clip` if that is set. With fp16 loss scaling
        an overflow is routine (the scaler skips that step), so it is not reported: zero is returned."""
        acc = self.accelerator
        norm = acc.clip_grad_norm_(self.params, clip) if clip else None
        if acc.scaler is not None:
            return torch.zeros((), device=acc.device)
        if norm is None:
            grads = [p.grad.detach() for p in self.params if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return torch.zeros((), device=acc.device) if norm is None else norm.detach().float()

    def training_labels(self, batch: dict) -> torch.Tensor | None:
        """Class labels, each dropped to the null class with chance `cond_dropout` (for guidance)."""
        denoiser = self.model.denoiser
        if denoiser.num_classes is None:
            return None
        labels = batch["labels"].clone()
        dropped = torch.rand(labels.shape, generator=self.noise_rng) < self.config.model.cond_dropout
        labels[dropped] = denoiser.null_class
        return labels.to(self.accelerator.device)

    # ---- what the loop writes ----------------------------------------------------------------------
    def check_finite(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """Stop before a diverged model is logged or saved, naming the step where it went wrong.
        `losses` holds train_step's (loss, gradient norm) pairs; returns the losses."""
        def advice() -> str:
            return (f"{checkpoints.last_good(self.run.checkpoints)}: lower --lr (now {self.config.optim.lr}), "
                    "lengthen --warmup-steps or set --clip-grad, then run again with --resume")

        return finite_losses(losses, self.state.step, advice, names=("the loss", "the gradients' norm"))

    def log(self, losses: list[torch.Tensor], images_per_s: float, bar) -> None:
        values = self.check_finite(losses)
        loss = values.mean().item()
        show_progress(bar, loss, images_per_s, step=self.state.step, fraction_done=self.fraction_done(),
                      step_budget=self.budget.steps)
        if self.accelerator.is_main_process:
            row = {"step": self.state.step, "epoch": round(self.stream.epochs_done, 4), "loss": loss, "lr": self.lr,
                   "images_per_s": images_per_s, "seconds": round(self.state.seconds, 2)}
            with self.writing(self.run.metrics):
                self.metrics.append(row)
            self.track(row)

    def track(self, row: dict) -> None:
        """Send a metrics row to the trackers of --log-with, if any (main process only)."""
        if self.config.run.log_with:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

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
        names = self.model.class_names
        labels = columns = None
        if names:  # one row per class
            columns = max(1, -(-run.sample_count // len(names)))
            labels = row_labels(len(names), columns)
        with self.ema_weights():
            images = generate(self.model, len(labels) if names else run.sample_count, sampler=run.sample_sampler,
                              steps=run.sample_steps, seed=0, class_labels=labels, cfg_scale=run.sample_cfg_scale)
        self.model.denoiser.train()
        settings = {"step": self.state.step, "sampler": run.sample_sampler, "steps": run.sample_steps, "seed": 0}
        if names:
            settings["cfg_scale"] = run.sample_cfg_scale
        grid = self.run.sample_path(self.state.step)
        with self.writing(grid):
            save_png(make_grid(images, columns, names), grid, settings)
        with self.writing(self.run.loss_plot):
            self.run.plot_loss(self.metrics)

    def evaluate(self) -> dict | None:
        """Fréchet distance and class accuracy of the moving-average model, logged to metrics.csv."""
        if self.evaluator is None:
            return None
        run = self.config.run
        with self.ema_weights():
            result = self.evaluator(self.model, run.eval_count, sampler=run.sample_sampler, steps=run.sample_steps,
                                    cfg_scale=run.sample_cfg_scale)
        self.model.denoiser.train()
        row = {"step": self.state.step, "frechet_distance": result["frechet_distance"]}
        if "class_accuracy" in result:
            row["class_accuracy"] = result["class_accuracy"]
        with self.writing(self.run.metrics):
            self.metrics.append(row)
        self.track(row)
        log.info("step %d: %s", self.state.step, ", ".join(f"{k} {v}" for k, v in row.items() if k != "step"))
        self.last_evaluation = result
        return result

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
        checkpoints.save_checkpoint(self.run.checkpoints, self.state.step, tensors, state,
                                    self.config.run.keep_checkpoints)

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


@stop_signals()  # SIGTERM and SIGHUP save a checkpoint, like Ctrl-C
def train(config: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train a model; returns the folder of the saved model."""
    testhooks.watch_writes(out)
    trainer = Trainer(config, out, resume=resume, overwrite=overwrite)
    try:
        model_dir = trainer.fit()
    finally:
        trainer.stream.close()  # stops the processes that read a large folder ahead
        if config.run.log_with:
            trainer.accelerator.end_training()  # flushes and closes the trackers
    testhooks.report(trainer)
    return model_dir
