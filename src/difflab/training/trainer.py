"""The one training loop.

Unconditional, conditioned and fine-tuning runs are all this loop: a batch stream, a denoiser, a
noise schedule and the parameters to train. Built on `accelerate`, so
`accelerate launch -m difflab train ...` runs the same code on several GPUs or machines.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from difflab.batch_memory import vae_batch
from difflab.config import TEXT_TIMESTEP_SHIFT, TrainConfig, dumps_config
from difflab.data import BatchStream, ImageDataset, open_dataset
from difflab.devices import auto_precision
from difflab.diffusion.generate import generate, row_labels
from difflab.errors import ConfigError, DataError
from difflab.images import make_grid
from difflab.models.build import build_model
from difflab.models.conditioning import Conditioning
from difflab.models.model import DiffusionModel
from difflab.models.prompt_syntax import escape, parse_prompt
from difflab.storage.card import model_card
from difflab.storage.folder import save_model
from difflab.training import checkpoints, finetune, memory_features
from difflab.training.budget import Budget, lr_factor
from difflab.training.loop import Cadence, Loop, Task
from difflab.training.losses import group_losses, min_snr_weights, per_image_loss, prediction_target, shifted_timesteps
from difflab.training.reporting import TRACKER_FOLDER, check_tracker, flat_settings
from difflab.training.run_folder import RunFolder
from difflab.training.signals import stop_signals
from difflab.training.steps import StepStats, TrainState
from difflab.training.text_batches import CachedLatents, CaptionTokens, PromptCache, TrainingNetwork, sample_latents
from difflab.training.text_model import (
    PIXEL_SPACE,
    TextModelParts,
    build_text_model,
    check_same_tokenizer,
    given_text_parts,
    tokenizer_fingerprint,
)

log = logging.getLogger("difflab")


def resolve_data_settings(config: TrainConfig, data: ImageDataset) -> TrainConfig:
    """Fill in what was left to the data (image size, channels), so the saved config is complete."""
    return dataclasses.replace(config, data=dataclasses.replace(
        config.data, image_size=data.image_size, channels=data.channels))


def mixed_precision(choice: str, device: str = "auto") -> str:
    """auto: what runs fast on the device (devices.auto_precision); otherwise the choice itself."""
    return auto_precision(device) if choice == "auto" else choice


def make_accelerator(config: TrainConfig, out: str | Path | None = None):
    """A fresh Accelerator for this run. accelerate keeps one state per process and refuses a second
    run with other settings (say, another precision); clearing its per-run part, not the distributed
    part, lets one process train several runs (a notebook, the tests). Trackers (`--log-with`) write
    under the run folder `out`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # private API, but the only way to a second run with other settings in one process (pinned by
    # tests/test_training.py::test_one_process_trains_runs_of_different_precisions)
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    trackers = {}
    if config.run.log_with:
        trackers = {"log_with": config.run.log_with, "project_dir": str(Path(out) / TRACKER_FOLDER)}
    return Accelerator(cpu=config.run.device == "cpu",
                       mixed_precision=mixed_precision(config.optim.precision, config.run.device), **trackers)


@dataclass
class MicroBatch:
    """One micro-batch on the device with what its forward pass needs: the images (latents, for a latent
    model), their conditioning (class labels, some dropped to the null class for guidance; or prompt
    embeddings), the noise and a timestep per image. `token_ids` stand for the prompt embeddings when the
    text encoder trains, which computes them in the step."""

    images: torch.Tensor
    conditioning: Conditioning | torch.Tensor | None
    noise: torch.Tensor
    timesteps: torch.Tensor
    token_ids: torch.Tensor | None = None
    groups: torch.Tensor | None = None  # each image's loss group, when the data has them


# Training data made for the run instead of opened by its spec (DreamBooth's instance and class images):
# called with the settled config, the pretrained model and the run folder (ready to write in, say to cache
# generated images), it returns the dataset, captions (and loss groups) included.
DataMaker = Callable[[TrainConfig, DiffusionModel, RunFolder], ImageDataset]


class TrainedPart(Protocol):
    """What trains when it is neither the whole network nor LoRA on it (textual inversion's new token rows):
    made from the settled config and the pretrained model by a `PartMaker`, after which only its parameters
    require gradients. A checkpoint holds only its tensors (and their optimizer state), and the run's model
    is what it saves."""

    text_encoder_in_step: bool  # the step runs the text encoder forward (its output is not a ready input)

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def save(self, folder: Path, model: DiffusionModel) -> None: ...


PartMaker = Callable[[TrainConfig, DiffusionModel], TrainedPart]


def settle_settings(config: TrainConfig, made_data: bool = False
                    ) -> tuple[TrainConfig, ImageDataset | None, DiffusionModel | None]:
    """The run's complete settings, its data and (fine-tuning) the pretrained model. They are decided
    together: the data fills in the image size and channels left to it; with --from, the pretrained
    model decides the network, schedule, image size and channels, and the data is fitted to it.
    `made_data`: the data comes from a DataMaker once the run folder is ready (None is returned for it)."""
    if config.run.sample_prompts is not None:
        validation_prompts(config.run, None)  # an empty --sample-prompts is refused before any work
    config, data, base = settings_and_data(config, made_data)
    return resolve_timestep_shift(config), data, base


def resolve_timestep_shift(config: TrainConfig) -> TrainConfig:
    """--timestep-shift left to difflab: TEXT_TIMESTEP_SHIFT for a new latent text model (its small latent's
    layout is decided at high noise), 1 (the uniform draw) for every other run."""
    if config.optim.timestep_shift is not None:
        return config
    m = config.model
    new_latent_text = not m.base and m.conditioning == "text" and (m.vae or "").lower() != PIXEL_SPACE
    shift = TEXT_TIMESTEP_SHIFT if new_latent_text else 1.0
    return dataclasses.replace(config, optim=dataclasses.replace(config.optim, timestep_shift=shift))


def settings_and_data(config: TrainConfig, made_data: bool
                      ) -> tuple[TrainConfig, ImageDataset | None, DiffusionModel | None]:
    if config.model.base:
        if made_data:
            base = finetune.load_base(config)
            return finetune.settings_from_base(config, base), None, base
        return fine_tuning_settings(config)
    if made_data:
        raise ConfigError("training data made for the run needs a pretrained model to start from (--from)")
    if config.model.lora_rank:  # adapters on new random weights, with the weights themselves frozen, learn nothing
        raise ConfigError("--lora-rank trains adapters on a pretrained text-to-image model: give that model with "
                          "--from (a new model trains every weight)")
    d, text = config.data, config.model.conditioning == "text"
    if text and d.channels == 1:
        raise DataError("--conditioning text makes RGB models (the VAE takes 3 channels); leave out --channels 1")
    data = open_dataset(d.spec, d.image_size, 3 if text else d.channels, d.split, d.strict, d.memory_limit_mb,
                        caption_column=d.caption_column, caption_template=d.caption_template)
    if config.model.conditioning == "class" and not data.has_labels:
        raise DataError(f"--conditioning class needs labelled data, and {d.spec} has no labels "
                        "(put each class's images in its own sub-folder)")
    if text and not data.has_captions:
        raise DataError(f"--conditioning text needs captions, and {d.spec} has none: add a metadata.jsonl "
                        "(file_name, text) or IMAGE.txt files, or give labelled data a --caption-template such as "
                        "'a photo of a {label}'")
    return resolve_data_settings(config, data), data, None


def fine_tuning_settings(config: TrainConfig) -> tuple[TrainConfig, ImageDataset, DiffusionModel]:
    base = finetune.load_base(config)
    settled = finetune.settings_from_base(config, base)
    d = settled.data
    text = settled.model.conditioning == "text"
    data = open_dataset(d.spec, d.image_size, 3 if text else None,  # a pixel model's data: its own channels
                        d.split, d.strict, d.memory_limit_mb,
                        caption_column=d.caption_column, caption_template=d.caption_template)
    data = finetune.fit_data(data, settled)
    return resolve_data_settings(settled, data), data, finetune.fine_tuned(base, settled, data)


VALIDATION_PROMPTS = 8
GRID_BATCH = 64  # the most grid images generated per call (fewer where the VAE's decoder needs the memory)


def validation_prompts(run, data) -> list[str]:
    """The grids' prompts: --sample-prompts, or distinct captions spread over the data."""
    if run.sample_prompts:
        prompts = [p.strip() for p in run.sample_prompts.split("|") if p.strip()]
        if not prompts:
            raise ConfigError("--sample-prompts holds no prompt; separate prompts with |")
        for prompt in prompts:  # A1111's syntax (docs/prompts.md)
            parse_prompt(prompt)
        return prompts
    distinct = list(dict.fromkeys(c for c in data.captions if c))
    step = max(1, len(distinct) // VALIDATION_PROMPTS)
    return distinct[::step][:VALIDATION_PROMPTS]


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
        if base is not None:  # a pretrained model: refused before class images are generated for it
            self.check_memory(base, base.info.image_size, bool(self.config.model.train_text_encoder),
                              textual_inversion=trained is not None)
        if maker is not None:
            made, base = self.made_data(maker, base)
        data = made
        self.text: TextModelParts | None = None  # text-to-image runs: what the model was made of
        if base is not None and base.prompts is not None:
            self.text = TextModelParts(base, bool(self.config.model.train_text_encoder), None)
        if base is None:
            self.model = self.new_model(data, clock, given)
            self.check_memory(self.model, data.image_size, bool(self.text and self.text.train_text_encoder),
                              textual_inversion=False)
        else:
            self.model = base
        if self.config.model.lora_rank:
            self.add_lora()
        self.part = trained(self.config, self.model) if trained is not None else None
        self.full_frozen = self.use_memory_features()
        self.describe_training(data)
        self.start_reporting(data)
        self.params, self.optimizer, self.ema = self.make_optimizer()
        self.captions = CaptionTokens(self.model.prompts, self.config.model.cond_dropout) if self.text else None
        self.validation_prompts = validation_prompts(self.config.run, data) if self.text else []
        self.train_mode()
        self.stream, self.noise_rng = self.data_order(data)
        self.prompt_cache = self.cache_prompts(data)
        groups = getattr(data, "loss_groups", None)
        self.loss_groups = groups  # named groups of images, weighted and reported apart (None: one group)
        self.loop = Loop(self, self.run, Budget.from_config(self.config.run), self.images_per_step,
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

    def check_memory(self, model: DiffusionModel, image_size: int, trains_text: bool, *,
                     textual_inversion: bool) -> None:
        """The run's estimated peak memory on its device (difflab.memory), from the model's parameter counts and
        the run's flags, before the optimizer and any step: refused (ConfigError naming the flags that would make
        it fit) when it exceeds the device's free memory, unless --yes. Said in the log from
        SAY_MEMORY_FROM bytes (small runs stay quiet) or with --yes. Main process only."""
        from difflab.memory import SAY_MEMORY_FROM, ModelShape, check_training_memory, estimate_training

        if not self.accelerator.is_main_process:
            return
        c = self.config
        flags = dict(
            height=image_size, width=image_size, batch=c.optim.batch_size,
            # textual inversion trains a few embedding rows: like LoRA, a sliver of the weights trains; its
            # frozen networks stay in fp32 (use_memory_features), so its weights are counted at full size
            lora=bool(c.model.lora_rank) or textual_inversion, checkpointing=c.optim.gradient_checkpointing,
            optimizer=c.optim.optimizer, precision="no" if textual_inversion else self.accelerator.mixed_precision,
            train_text_encoder=trains_text and model.prompts is not None and not textual_inversion,
            # DreamBooth's prior preservation mixes class images into the data (a batch of 2 holds one of each on
            # average, training/dreambooth.py make_data) rather than doubling the batch as diffusers' script does
            prior_preservation=False)
        shape = ModelShape.of_model(model)
        said = check_training_memory(shape, self.accelerator.device, yes=self.yes,
                                     lora_flag="--lora" if hasattr(c, "dreambooth") else "--lora-rank 4", **flags)
        if self.yes or estimate_training(shape, **flags).total >= SAY_MEMORY_FROM:
            log.info(said)

    def made_data(self, maker: DataMaker, base: DiffusionModel) -> tuple[ImageDataset, DiffusionModel]:
        """The data a DataMaker makes for the run (the main process first: it may write files the others
        then read), fitted to the pretrained model; and that model, described as a model of this data."""
        acc = self.accelerator
        if not acc.is_main_process:
            acc.wait_for_everyone()
        data = finetune.fit_data(maker(self.config, base, self.run), self.config)
        if acc.is_main_process:
            acc.wait_for_everyone()
        return data, finetune.fine_tuned(base, self.config, data)

    def add_lora(self) -> None:
        """LoRA as the choice of trainable parameters: adapters on the attention projections (of the text
        encoder too when it trains), every other weight frozen (models/lora.py)."""
        from difflab.models.lora import add_lora

        if self.text is None:
            raise ConfigError("--lora-rank adapts text-to-image models; this model has no text encoder")
        with torch.random.fork_rng(devices=[]):  # the adapters' first weights from the run's seed: same seed, same run
            torch.manual_seed(self.config.run.seed)
            add_lora(self.model, self.config.model.lora_rank, text_encoder=self.text.train_text_encoder)

    def use_memory_features(self) -> dict:
        """--gradient-checkpointing, and the frozen networks in the half type of fp16/bf16 mixed precision;
        returns the full-precision weights of frozen networks that the saved model holds (memory_features)."""
        trains_text = bool(self.text and self.text.train_text_encoder)
        if self.config.optim.gradient_checkpointing:
            memory_features.enable_gradient_checkpointing(self.model, text_encoder=trains_text)
        lora = bool(self.config.model.lora_rank)
        if self.part is not None:  # textual inversion: its text encoder runs in the step; left as it is
            return {}
        return memory_features.hold_frozen_in_half(self.model, self.accelerator.mixed_precision, keep_full=not lora,
                                                   device=self.accelerator.device)

    def new_model(self, data: ImageDataset, clock, given=None) -> DiffusionModel:
        c = self.config
        if c.model.conditioning == "text":
            self.text = build_text_model(c, data, self.run.root, self.accelerator, clock, given)
            return self.text.model
        names = data.class_names if c.model.conditioning == "class" else None
        return build_model(c.model, data.image_size, data.channels, data.source, c.run.seed, names)

    def describe_training(self, data: ImageDataset) -> None:
        """What the model card and difflab.json say about the training (completed by save_model)."""
        training = self.model.info.training = {"images": len(data)}
        if self.config.model.preset != finetune.BASE_PRESET:
            training["preset"] = self.config.model.preset
        if self.model.class_names or self.text:
            training["cond_dropout"] = self.config.model.cond_dropout
        if self.text:
            training.update(self.text.training_rows(self.config, data))
        if self.config.model.lora_rank:
            training["lora_rank"] = self.config.model.lora_rank
        if self.config.optim.timestep_shift != 1:
            training["timestep_shift"] = self.config.optim.timestep_shift
        training.update(getattr(data, "notes", None) or {})  # what made data says of itself (DreamBooth's prompts)

    def start_reporting(self, data: ImageDataset) -> None:
        """metrics.csv, and on the main process the trackers of --log-with and the evaluator of --eval-every."""
        acc, config = self.accelerator, self.config
        self.evaluator = None
        if not acc.is_main_process:
            return
        if config.run.log_with:
            acc.init_trackers("difflab", config=flat_settings(config),
                              init_kwargs={"wandb": {"name": self.run.root.name, "dir": str(self.run.root)}})
        if config.run.eval_every:
            from difflab.metrics.evaluate import Evaluator

            self.evaluator = Evaluator.for_data(config.data.spec, data.image_size, data.channels)

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

    def data_order(self, data: ImageDataset) -> tuple[BatchStream, torch.Generator]:
        """This process's share of the batches, and its generator of noise, timesteps and label dropout."""
        acc, seed = self.accelerator, self.config.run.seed
        if self.model.latent and self.config.data.cache_latents and isinstance(data, ImageDataset):
            data = CachedLatents(data, self.model.codec, self.config.data.flip, acc.device)  # batches sized by memory
        if self.captions is not None:
            self.captions.check_lengths(data.data.captions if isinstance(data, CachedLatents) else data.captions)
        stream = BatchStream(data, self.config.optim.batch_size, seed=seed, flip=self.config.data.flip,
                             rank=acc.process_index, world_size=acc.num_processes)
        return stream, torch.Generator().manual_seed(seed * 7919 + acc.process_index)

    def cache_prompts(self, data: ImageDataset) -> PromptCache | None:
        """A frozen text encoder's embeddings of the data's distinct captions (and of the empty caption that
        caption dropout uses), computed once, when they fit the memory set aside for them."""
        if not self.text or self.text_in_step:
            return None
        captions = getattr(data, "captions", None)
        if not captions:
            return None
        distinct = list(dict.fromkeys([*captions, *([""] if self.config.model.cond_dropout else [])]))
        return PromptCache.build(distinct, self.model.prompts.text_encoder, self.captions)

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
        if self.text is None:
            return False
        return self.text.train_text_encoder or bool(getattr(self, "part", None) and self.part.text_encoder_in_step)

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
        return self.train_step(self.next_micro_batches())

    def at_grid(self, loop: Loop) -> None:
        self.write_samples()

    def at_eval(self, loop: Loop) -> None:
        self.evaluate()

    def advice(self) -> str:
        """What to do when the loss or the gradients stop being numbers."""
        return (f"lower --lr (now {self.config.optim.lr}), lengthen --warmup-steps or set --clip-grad, then run "
                "again with --resume")

    def next_micro_batches(self) -> list[MicroBatch]:
        """The next optimizer step's `grad_accum` micro-batches, in the run's data order and noise."""
        return [self.micro_batch(next(self.stream)) for _ in range(self.config.optim.grad_accum)]

    def micro_batch(self, batch: dict) -> MicroBatch:
        x0 = self.model_space(batch)
        noise, timesteps = self.draw_noise(x0)
        groups = batch["groups"].to(self.accelerator.device) if "groups" in batch else None
        if self.captions is None:
            return MicroBatch(x0, self.training_labels(batch), noise, timesteps, groups=groups)
        captions = self.captions.drop(batch["captions"], self.noise_rng)
        if self.prompt_cache is not None:
            return MicroBatch(x0, Conditioning(text=self.prompt_cache(captions)), noise, timesteps, groups=groups)
        token_ids = self.captions.token_ids(captions).to(self.accelerator.device)
        if self.text_in_step:
            return MicroBatch(x0, None, noise, timesteps, token_ids, groups)
        with torch.no_grad():  # a frozen text encoder: its output is an input
            embeddings = self.model.prompts.text_encoder(token_ids)[0]
        return MicroBatch(x0, Conditioning(text=embeddings), noise, timesteps, groups=groups)

    def model_space(self, batch: dict) -> torch.Tensor:
        """The batch as the diffusion model sees it: images, or latents drawn from the VAE's posterior
        (cached before training, or encoded now)."""
        device = self.accelerator.device
        if "latent_mean" in batch:
            return sample_latents(batch, self.model.codec.scaling_factor, self.noise_rng).to(device)
        images = batch["images"].to(device, non_blocking=True)
        if not self.model.latent:
            return images
        with torch.no_grad():
            posterior = self.model.codec.vae.encode(images.to(self.model.codec.dtype)).latent_dist
        return sample_latents({"latent_mean": posterior.mean.float(), "latent_std": posterior.std.float()},
                              self.model.codec.scaling_factor, self.noise_rng)

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

    def draw_noise(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian noise like `x0` and a random timestep per image (uniform, or shifted towards high noise by
        --timestep-shift), from the run's noise generator."""
        device = self.accelerator.device
        noise = torch.randn(x0.shape, generator=self.noise_rng).to(device)
        steps = self.model.noise_schedule.config.num_train_timesteps
        shift = self.config.optim.timestep_shift
        if shift == 1:  # the uniform draw as it always was: the same seed gives the same run as before
            t = torch.randint(0, steps, (x0.shape[0],), generator=self.noise_rng)
        else:
            t = shifted_timesteps(torch.rand(x0.shape[0], generator=self.noise_rng), shift, steps)
        return noise, t.to(device)

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
        with self.ema_weights(), self.frozen_half_autocast():
            images = generate(self.model, count, sampler=run.sample_sampler, steps=run.sample_steps, seed=0,
                              class_labels=labels, prompts=prompts, cfg_scale=self.cfg_scale,
                              batch_size=self.sample_batch_size(count))
        self.train_mode()
        settings = {"step": self.state.step, "sampler": run.sample_sampler, "steps": run.sample_steps, "seed": 0}
        if names or prompts:
            settings["cfg_scale"] = self.cfg_scale
        if prompts:
            settings["prompts"] = " | ".join(self.validation_prompts)
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

        noise_states = gather_object([self.noise_rng.get_state()])
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
            self.noise_rng.set_state(noise_state)

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
        if self.accelerator.is_main_process:
            self.model.info.training.update(
                steps=self.state.step, images_seen=self.state.images_seen, minutes=round(self.state.seconds / 60, 2),
                device=str(self.accelerator.device), ema_decay=self.config.optim.ema_decay, lr=self.config.optim.lr)
            memory_features.restore_full(self.model, self.full_frozen)  # the frozen parts as they were given
            with self.ema_weights(), self.loop.writing(self.run.model):
                if self.part is not None:
                    self.part.save(self.run.model, self.model)
                elif self.config.model.lora_rank:
                    self.save_lora()
                else:
                    card = model_card(self.model, str(self.run.model), dumps_config(self.config))
                    save_model(self.model, self.run.model, card)
        self.accelerator.wait_for_everyone()
        return self.run.model

    def save_lora(self) -> None:
        """A LoRA run's model: only the adapters, as pytorch_lora_weights.safetensors, with its card."""
        from difflab.models.lora import lora_summary
        from difflab.storage.card import lora_card
        from difflab.storage.lora import save_lora

        training = self.model.info.training
        summary = lora_summary(self.model)
        card = lora_card(str(self.run.model), str(self.config.model.base), rank=summary["rank"],
                         alpha=summary["alpha"], targets=summary["targets"], parameters=summary["parameters"],
                         instance_prompt=training.get("instance_prompt"), token=training.get("token"),
                         prompt=(self.validation_prompts or [None])[0], data=self.model.info.data, training=training)
        save_lora(self.model, self.run.model, card=card)

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
