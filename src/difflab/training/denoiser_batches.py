"""What a denoiser step trains on: the run's data order and, for each micro-batch, the clean sample (images,
or latents drawn from the VAE's posterior), its conditioning (class labels with guidance dropout, or
prompt embeddings / token ids), the noise and a timestep per image, from the run's one noise generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difflab.config import TrainConfig
from difflab.data import BatchStream, ImageDataset
from difflab.models.conditioning import Conditioning
from difflab.models.model import DiffusionModel
from difflab.training.losses import shifted_timesteps
from difflab.training.text_batches import CachedLatents, CaptionTokens, PromptCache, sample_latents


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


class DenoiserBatches:
    """This process's share of the batches (`stream`, checkpointed by the loop) and its generator of noise,
    timesteps, caption and label dropout (`noise_rng`, in every checkpoint). `text`: a text model;
    `text_in_step`: its text encoder runs in the step (it trains), so batches carry token ids."""

    def __init__(self, config: TrainConfig, model: DiffusionModel, accelerator, data: ImageDataset, *, text: bool,
                 text_in_step: bool):
        self.config, self.model, self.device = config, model, accelerator.device
        self.text_in_step = text_in_step
        self.captions = CaptionTokens(model.prompts, config.model.cond_dropout) if text else None
        self.stream, self.noise_rng = self.data_order(data, accelerator)
        self.prompt_cache = self.cache_prompts(data) if text and not text_in_step else None

    def data_order(self, data: ImageDataset, accelerator) -> tuple[BatchStream, torch.Generator]:
        acc, seed = accelerator, self.config.run.seed
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
        captions = getattr(data, "captions", None)
        if not captions:
            return None
        distinct = list(dict.fromkeys([*captions, *([""] if self.config.model.cond_dropout else [])]))
        return PromptCache.build(distinct, self.model.prompts.text_encoder, self.captions)

    def next_step(self) -> list[MicroBatch]:
        """The next optimizer step's `grad_accum` micro-batches, in the run's data order and noise."""
        return [self.micro_batch(next(self.stream)) for _ in range(self.config.optim.grad_accum)]

    def micro_batch(self, batch: dict) -> MicroBatch:
        x0 = self.model_space(batch)
        noise, timesteps = self.draw_noise(x0)
        groups = batch["groups"].to(self.device) if "groups" in batch else None
        if self.captions is None:
            return MicroBatch(x0, self.training_labels(batch), noise, timesteps, groups=groups)
        captions = self.captions.drop(batch["captions"], self.noise_rng)
        if self.prompt_cache is not None:
            return MicroBatch(x0, Conditioning(text=self.prompt_cache(captions)), noise, timesteps, groups=groups)
        token_ids = self.captions.token_ids(captions).to(self.device)
        if self.text_in_step:
            return MicroBatch(x0, None, noise, timesteps, token_ids, groups)
        with torch.no_grad():  # a frozen text encoder: its output is an input
            embeddings = self.model.prompts.text_encoder(token_ids)[0]
        return MicroBatch(x0, Conditioning(text=embeddings), noise, timesteps, groups=groups)

    def model_space(self, batch: dict) -> torch.Tensor:
        """The batch as the diffusion model sees it: images, or latents drawn from the VAE's posterior
        (cached before training, or encoded now)."""
        device = self.device
        if "latent_mean" in batch:
            return sample_latents(batch, self.model.codec.scaling_factor, self.noise_rng).to(device)
        images = batch["images"].to(device, non_blocking=True)
        if not self.model.latent:
            return images
        with torch.no_grad():
            posterior = self.model.codec.vae.encode(images.to(self.model.codec.dtype)).latent_dist
        return sample_latents({"latent_mean": posterior.mean.float(), "latent_std": posterior.std.float()},
                              self.model.codec.scaling_factor, self.noise_rng)

    def draw_noise(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian noise like `x0` and a random timestep per image (uniform, or shifted towards high noise by
        --timestep-shift), from the run's noise generator."""
        noise = torch.randn(x0.shape, generator=self.noise_rng).to(self.device)
        steps = self.model.noise_schedule.config.num_train_timesteps
        shift = self.config.optim.timestep_shift
        if shift == 1:  # the uniform draw as it always was: the same seed gives the same run as before
            t = torch.randint(0, steps, (x0.shape[0],), generator=self.noise_rng)
        else:
            t = shifted_timesteps(torch.rand(x0.shape[0], generator=self.noise_rng), shift, steps)
        return noise, t.to(self.device)

    def training_labels(self, batch: dict) -> torch.Tensor | None:
        """Class labels, each dropped to the null class with chance `cond_dropout` (for guidance)."""
        denoiser = self.model.denoiser
        if denoiser.num_classes is None:
            return None
        labels = batch["labels"].clone()
        dropped = torch.rand(labels.shape, generator=self.noise_rng) < self.config.model.cond_dropout
        labels[dropped] = denoiser.null_class
        return labels.to(self.device)
