"""The denoiser's training: the task the one loop (training/loop.py) runs for every run that trains a
UNet — unconditional, class- or text-conditional, fine-tuning, DreamBooth, LoRA, textual inversion.

Its pieces, each in its own module: the settings and data (`settings.py`), the accelerator
(`accelerator.py`), the model and what trains of it (`model_setup.py`), the batches (`denoiser_batches.py`),
and what the run records and saves (`saving.py`). Here: set-up in order, the step, grids and evaluations,
and what a checkpoint holds. Built on `accelerate`, so `accelerate launch -m difflab train ...` runs the
same code on several GPUs or machines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from difflab.batch_memory import vae_batch
from difflab.config import TrainConfig
from difflab.data import ImageDataset
from difflab.diffusion.generate import generate, row_labels
from difflab.diffusion.request import GenerationRequest
from difflab.images import make_grid
from difflab.models.prompt_syntax import escape
from difflab.training import checkpoints, memory_features
from difflab.training.accelerator import make_accelerator
from difflab.training.budget import Budget, lr_factor
from difflab.training.denoiser_batches import DenoiserBatches, MicroBatch
from difflab.training.loop import Cadence, Loop, Task
from difflab.training.losses import group_losses, min_snr_weights, per_image_loss, prediction_target
from difflab.training.model_setup import PartMaker, set_up_model
from difflab.training.reporting import check_tracker, flat_settings
from difflab.training.run_folder import RunFolder
from difflab.training.saving import record_training, save_run_model, time_split, time_split_line
from difflab.training.settings import DataMaker, settle_settings, validation_prompts
from difflab.training.signals import stop_signals
from difflab.training.steps import StepStats, TrainState
from difflab.training.text_batches import TrainingNetwork
from difflab.training.text_model import check_same_tokenizer, given_text_parts, tokenizer_fingerprint

log = logging.getLogger("difflab")

GRID_BATCH = 64  # the most grid images generated per call (fewer where the VAE's decoder needs the memory)


class Trainer(Task):
    """The denoiser's task of the one loop (training/loop.py): a batch is images (or latents) with their
    conditioning, noise and timesteps, the loss is the denoising loss, and a checkpoint holds what trains,
    its optimizer and moving average. Set up in the order a reader follows: the settings and data, the run
    folder, the model, what the run reports, the optimizer, the batch stream and noise, and the checkpoint
    to resume from.
    `clock` (seconds) measures training time for --minutes and images/s; tests inject one."""

    def __init__(self, config: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                 clock: Callable[[], float] = time.perf_counter, data: DataMaker | None = None,
                 trained: PartMaker | None = None, yes: bool = False):
        config.validate()
        self.yes = yes  # start even when the memory estimate says the run will not fit (--yes)
        if config.run.sample_prompts:  # their syntax, before the run folder is made
            validation_prompts(config.run, None)
        check_tracker(config.run.log_with)
        self.accelerator = make_accelerator(config, out)
        self.config, made, base = settle_settings(config, made_data=data is not None)
        # a new text model's given VAE and text encoder, loaded, and its sizes checked: before the run folder
        # is touched and before its VAE stage trains for minutes
        given = given_text_parts(self.config, made) if base is None and self.config.model.conditioning == "text" \
            else None
        self.run = RunFolder(out)
        checkpoint = self.prepare_run_folder(resume=resume, overwrite=overwrite)
        try:
            self.set_up(made, base, data, trained, given, checkpoint, clock)
        except BaseException:
            # a start refused before its first step leaves nothing behind, so the corrected command runs as
            # it is (a stage that trained, generated class images or a checkpoint are kept: they are work)
            if checkpoint is None and self.accelerator.is_main_process:
                self.run.discard_unstarted()
            raise

    def set_up(self, made, base, maker: DataMaker | None, trained: PartMaker | None, given, checkpoint: Path | None,
               clock) -> None:
        """The rest of __init__, once the run folder is ready: the model, reporting, optimizer, data order and
        the checkpoint to resume from."""
        built, data = set_up_model(self.config, self.accelerator, self.run, made, base, maker, trained, given, clock,
                                   yes=self.yes)
        self.built = built
        self.model, self.text, self.part = built.model, built.text, built.part
        record_training(self.model, self.config, data=data, text=self.text)
        self.start_reporting(data)
        self.params, self.optimizer, self.ema = self.make_optimizer()
        self.validation_prompts = validation_prompts(self.config.run, data) if self.text else []
        self.train_mode()
        self.batches = DenoiserBatches(self.config, self.model, self.accelerator, data, text=self.text is not None,
                                       text_in_step=self.text_in_step)
        self.stream = self.batches.stream
        groups = getattr(data, "loss_groups", None)
        self.loss_groups = groups  # named groups of images, weighted and reported apart (None: one group)
        self.loop = Loop(self, self.run, self.budget(), self.images_per_step,
                         Cadence.of_run(self.config.run), clock=clock, main=self.accelerator.is_main_process,
                         group_names=groups.names if groups is not None else (),
                         track=self.track if self.config.run.log_with else None)
        if checkpoint is not None:
            self.loop.resume(checkpoint)
        # accelerate's wrapper (DDP across processes) syncs the gradients, so the training forward pass goes
        # through it; everything else (samples, checkpoints, the saved model) uses self.model's networks, the
        # same modules with the same weights.
        trained_text_encoder = self.model.prompts.text_encoder if self.text_in_step else None
        self.synced_network, self.optimizer = self.accelerator.prepare(
            TrainingNetwork(self.model.denoiser, trained_text_encoder), self.optimizer)

    # ---- set-up, in the order __init__ runs it -------------------------------------------------------
    def prepare_run_folder(self, *, resume: bool, overwrite: bool) -> Path | None:
        """Check the folder may hold this run and write its config.toml (main process only); returns the
        checkpoint to resume from, if any."""
        acc = self.accelerator
        checkpoint = self.run.prepare(self.config, resume=resume, overwrite=overwrite, write=acc.is_main_process,
                                      barrier=acc.wait_for_everyone)
        acc.wait_for_everyone()  # no process reads the folder before the main one has set it up
        return checkpoint

    def budget(self) -> Budget:
        """The run's budget: with --minutes, what the VAE stage left of them (they bound the whole run)."""
        run = self.config.run
        budget = Budget.from_config(run, self.vae_seconds)
        if self.vae_seconds and run.minutes:  # the bar says how --minutes are split
            self.label = f"UNet ({budget.seconds / 60:.2g} of --minutes {run.minutes:g})"
        return budget

    @property
    def vae_seconds(self) -> float:
        """Training seconds of the run's VAE stage (0 when the run has none)."""
        report = self.text.vae_report if self.text else None
        return report.seconds if report else 0.0

    def start_reporting(self, data: ImageDataset) -> None:
        """metrics.csv, and on the main process the trackers of --log-with and the evaluator of --eval-every."""
        acc, config = self.accelerator, self.config
        self.evaluator, self.evaluator_seconds = None, 0.0
        if not acc.is_main_process:
            return
        if config.run.log_with:
            acc.init_trackers("difflab", config=flat_settings(config),
                              init_kwargs={"wandb": {"name": self.run.root.name, "dir": str(self.run.root)}})
        if config.run.eval_every:
            from difflab.metrics.evaluate import Evaluator

            started = time.perf_counter()  # its classifier (or attribute reader) trains now: said apart, not counted
            self.evaluator = Evaluator.for_data(config.data.spec, data.image_size, data.channels)
            self.evaluator_seconds = time.perf_counter() - started

    def make_optimizer(self) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, object | None]:
        """The trainable parameters (moved to the device), the optimizer over them (--optimizer), and their
        moving average."""
        from diffusers.training_utils import EMAModel

        o = self.config.optim
        self.model.to(self.accelerator.device)
        params = [p for network in self.model.modules() for p in network.parameters() if p.requires_grad]
        optimizer = memory_features.make_optimizer(o.optimizer, params, o.lr, o.weight_decay)
        ema = EMAModel(params, decay=o.ema_decay, foreach=True) if o.ema_decay else None
        return params, optimizer, ema

    def train_mode(self) -> None:
        """The trained networks in training mode, the frozen ones (a given VAE or text encoder) not."""
        for network in self.model.modules():
            network.eval()
        self.model.denoiser.train()
        if self.text_in_step:
            self.model.prompts.text_encoder.train()

    @property
    def text_in_step(self) -> bool:
        """Whether the step runs the text encoder forward: it trains, or a part of it does."""
        return self.built.text_in_step

    # ---- where the run stands ----------------------------------------------------------------------
    @property
    def state(self) -> TrainState:
        return self.loop.state

    @property
    def images_per_step(self) -> int:
        o = self.config.optim
        return o.batch_size * o.grad_accum * self.accelerator.num_processes

    def fraction_done(self) -> float:
        return self.loop.fraction_done()

    # ---- the task: what the one loop runs --------------------------------------------------------------
    def fit(self, after_step: Callable[[TrainState], None] | None = None) -> Path:
        """Train until the budget is used; then the last checkpoint, samples, evaluation and the model.
        `after_step(state)` runs after each step and what it writes (a notebook's or a test's hook): a
        KeyboardInterrupt raised there stops the run as Ctrl-C does, with a checkpoint."""
        self.loop.run(after_step)
        self.write_samples()
        if self.config.run.eval_every:
            self.evaluate()
        return self.save_model()

    def step(self, loop: Loop) -> StepStats:
        return self.train_step(self.batches.next_step())

    def at_grid(self, loop: Loop) -> None:
        self.write_samples()

    def at_eval(self, loop: Loop) -> None:
        self.evaluate()

    def advice(self) -> str:
        """What to do when the loss or the gradients stop being numbers."""
        return (f"lower --lr (now {self.config.optim.lr}), lengthen --warmup-steps or set --clip-grad, then run "
                "again with --resume")

    def train_step(self, micro_batches: list[MicroBatch]) -> StepStats:
        """One optimizer step over the micro-batches (their mean loss); the statistics stay on the device."""
        o, acc = self.config.optim, self.accelerator
        schedule = self.model.noise_schedule
        count = len(micro_batches)
        total = torch.zeros((), device=acc.device)
        group_stats = None
        for i, b in enumerate(micro_batches):
            x_t = schedule.add_noise(b.images, b.noise, b.timesteps)
            last = i == count - 1
            with nullcontext() if last else acc.no_sync(self.synced_network):  # gradients sync once per step
                with acc.autocast():
                    prediction = self.synced_network(x_t, b.timesteps, b.conditioning, b.token_ids)
                per_image = per_image_loss(prediction, prediction_target(schedule, b.images, b.noise, b.timesteps))
                loss = (per_image * self.loss_weights(b)).mean()
                acc.backward(loss / count)  # accelerate leaves the mean over micro-batches to us
            total += loss.detach() / count
            if b.groups is not None:
                sums, counts = group_losses(per_image, b.groups, len(self.loss_groups.names))
                group_stats = (sums, counts) if group_stats is None else (group_stats[0] + sums,
                                                                          group_stats[1] + counts)
        grad_norm = self.gradient_norm(o.clip_grad)
        self.lr = o.lr * lr_factor(self.state.step, self.fraction_done(), o.warmup_steps, o.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        if group_stats is None:
            return StepStats(loss=total, grad_norm=grad_norm)
        return StepStats(loss=total, grad_norm=grad_norm, group_loss=group_stats[0], group_count=group_stats[1])

    def loss_weights(self, b: MicroBatch) -> torch.Tensor:
        """Each image's weight in the loss: min-SNR-γ, times its loss group's weight (DreamBooth's prior
        loss weight on the class images)."""
        o = self.config.optim
        weights = torch.ones(b.images.shape[0], device=b.images.device)
        if o.min_snr_gamma:
            weights = weights * min_snr_weights(self.model.noise_schedule, b.timesteps, o.min_snr_gamma)
        if b.groups is not None:
            weights = weights * torch.tensor(self.loss_groups.weights, device=weights.device)[b.groups]
        return weights

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

    # ---- what the task writes ---------------------------------------------------------------------
    def track(self, row: dict) -> None:
        """Send a metrics row to the trackers of --log-with (main process only)."""
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

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

    @property
    def cfg_scale(self) -> float:
        """The guidance scale of grids and evaluations: the run's, or the model kind's default."""
        scale = self.config.run.sample_cfg_scale
        return self.model.default_cfg_scale if scale is None else scale

    def write_samples(self) -> None:
        """A grid at fixed seeds from the moving-average weights: one row per class for a class-conditional
        model; one column per validation prompt for a text model."""
        if not self.accelerator.is_main_process:
            return
        run = self.config.run
        names = self.model.class_names
        labels = columns = prompts = None
        if names:
            columns = max(1, -(-run.sample_count // len(names)))
            labels = row_labels(len(names), columns)
        elif self.text:
            columns = len(self.validation_prompts)
            # Captions are text, --sample-prompts are prompts (weights and all).
            shown = self.validation_prompts if run.sample_prompts else [escape(p) for p in self.validation_prompts]
            prompts = shown * max(1, -(-run.sample_count // columns))
        count = len(labels) if names else len(prompts) if prompts else run.sample_count
        request = GenerationRequest(count, sampler=run.sample_sampler, steps=run.sample_steps, seed=0,
                                    class_labels=labels, prompts=prompts, cfg_scale=self.cfg_scale)
        with self.ema_weights(), self.frozen_half_autocast():
            images = generate(self.model, request, batch_size=self.sample_batch_size(count))
        self.train_mode()
        settings = {"step": self.state.step, **request.settings(self.model)}
        with self.loop.writing():
            self.run.save_samples(make_grid(images, columns, names), self.state.step, settings, self.loop.metrics)

    def sample_batch_size(self, count: int) -> int:
        """Images generated (and decoded) per call for the grids: as many as the VAE's decoder has memory for."""
        if not self.model.latent:
            return min(count, GRID_BATCH)
        height, width = self.model.info.image_size, self.model.info.image_size
        return vae_batch(height, width, self.model.codec.dtype, self.accelerator.device, min(count, GRID_BATCH),
                         decode=True)

    def frozen_half_autocast(self):
        """Samples and evaluations of a model whose frozen weights are held in the half type run under the
        run's autocast, as its training steps do (a half weight takes no fp32 input outside it)."""
        half = memory_features.HALF_TYPES.values()
        halved = any(p.dtype in half for n in self.model.modules() for p in n.parameters())
        return self.accelerator.autocast() if halved else nullcontext()

    def evaluate(self) -> dict | None:
        """Fréchet distance and class accuracy of the moving-average model, logged to metrics.csv."""
        if self.evaluator is None:
            return None
        run = self.config.run
        with self.ema_weights(), self.frozen_half_autocast():
            result = self.evaluator(self.model, run.eval_count, sampler=run.sample_sampler, steps=run.sample_steps,
                                    cfg_scale=self.cfg_scale)
        self.train_mode()
        row = {"step": self.state.step, "frechet_distance": result["frechet_distance"]}
        if "class_accuracy" in result:
            row["class_accuracy"] = result["class_accuracy"]
        self.loop.record(row)
        log.info("step %d: %s", self.state.step, ", ".join(f"{k} {v}" for k, v in row.items() if k != "step"))
        return result

    def checkpoint_state(self) -> tuple[dict, dict] | None:
        from accelerate.utils import gather_object

        noise_states = gather_object([self.batches.noise_rng.get_state()])
        if not self.accelerator.is_main_process:
            return None
        optimizer_tensors, optimizer_meta = checkpoints.flatten_optimizer(self.optimizer.state_dict())
        tensors = {
            # only what trains, when a part of the model does (textual inversion, LoRA); else the whole network
            **({"trained": self.part.state_dict()} if self.part
               else {"model": self.trained_state(self.model.denoiser)}),
            "optimizer": optimizer_tensors,
            "rng": {f"noise.{rank}": state for rank, state in enumerate(noise_states)},
        }
        if self.text and self.text.train_text_encoder:
            tensors["text_encoder"] = self.trained_state(self.model.prompts.text_encoder)
        if self.ema is not None:
            tensors["ema"] = {str(i): p for i, p in enumerate(self.ema.shadow_params)}
        state = {"optimizer": optimizer_meta, "ema_step": self.ema.optimization_step if self.ema is not None else 0}
        if self.text:
            state["tokenizer"] = tokenizer_fingerprint(self.model.prompts.tokenizer)
        return tensors, state

    def load_checkpoint_state(self, tensors: dict, state: dict) -> None:
        if self.text:
            check_same_tokenizer(state.get("tokenizer"), self.model.prompts.tokenizer, self.run.root)
            if "text_encoder" in tensors:
                self.load_trained_state(self.model.prompts.text_encoder, tensors["text_encoder"], "text encoder")
        if self.part is not None:
            self.part.load_state_dict(tensors["trained"])
        else:
            self.load_trained_state(self.model.denoiser, tensors["model"], "model")
        self.optimizer.load_state_dict(checkpoints.unflatten_optimizer(tensors["optimizer"], state["optimizer"]))
        if self.ema is not None and "ema" in tensors:
            device = self.accelerator.device
            self.ema.shadow_params = [tensors["ema"][str(i)].to(device) for i in range(len(self.params))]
            self.ema.optimization_step = state["ema_step"]
        noise_state = tensors["rng"].get(f"noise.{self.accelerator.process_index}")
        if noise_state is not None:
            self.batches.noise_rng.set_state(noise_state)

    def trained_state(self, network: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint holds of a network: all of it, or for a LoRA run only the adapters (the frozen base
        comes from --from again on resume)."""
        return memory_features.trained_state(network) if self.config.model.lora_rank else network.state_dict()

    def load_trained_state(self, network: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
        if self.config.model.lora_rank:
            memory_features.load_trained_state(network, state, what)
        else:
            network.load_state_dict(state)

    def save_model(self) -> Path:
        """The run's model (main process), its training record completed: the moving-average weights, and
        the frozen parts as they were given."""
        if self.accelerator.is_main_process:
            split = time_split(self.state, self.text.vae_report if self.text else None, self.evaluator_seconds)
            record_training(self.model, self.config, state=self.state, device=str(self.accelerator.device), **split)
            log.info(time_split_line(split, self.state, self.config.run.minutes))
            memory_features.restore_full(self.model, self.built.full_frozen)
            with self.ema_weights(), self.loop.writing(self.run.model):
                save_run_model(self.model, self.config, self.run.model, self.part,
                               prompt=(self.validation_prompts or [None])[0])
        self.accelerator.wait_for_everyone()
        return self.run.model


@stop_signals()  # SIGTERM and SIGHUP save a checkpoint, like Ctrl-C
def train(config: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          clock: Callable[[], float] = time.perf_counter, yes: bool = False, data: DataMaker | None = None,
          trained: PartMaker | None = None, after_step: Callable[[TrainState], None] | None = None) -> Path:
    """Train a model; returns the folder of the saved model. `yes`: start even when the memory estimate
    says it will not fit. DreamBooth and textual inversion are this call with their `data` maker (and
    `trained` part)."""
    trainer = Trainer(config, out, resume=resume, overwrite=overwrite, clock=clock, data=data, trained=trained,
                      yes=yes)
    try:
        model_dir = trainer.fit(after_step)
    finally:
        trainer.stream.close()  # stops the processes that read a large folder ahead
        if config.run.log_with:
            trainer.accelerator.end_training()  # flushes and closes the trackers
    return model_dir
