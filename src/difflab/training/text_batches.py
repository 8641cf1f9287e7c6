"""What a text-to-image training batch carries into the one training step: latents (encoded once and
cached, or encoded on the fly), and token ids with captions dropped for classifier-free guidance.
And the module the step runs forward: the denoiser, behind the text encoder when that trains.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn

from difflab.batch_memory import free_memory, vae_batch
from difflab.data.dataset import mirrored_captions, pick, with_groups
from difflab.models.conditioning import Conditioning
from difflab.models.embeddings import expand_tokens
from difflab.models.text import PromptEncoder
from difflab.progress import progress_bar

log = logging.getLogger("difflab")

ENCODE_BATCH = 256  # the most images per VAE call when caching latents (fewer where memory is short)
PROMPT_BATCH = 64  # prompts per text-encoder call when caching embeddings
PROMPT_CACHE_SHARE = 0.1  # of the free memory that cached prompt embeddings may take


class TrainingNetwork(nn.Module):
    """Everything a training step runs forward, as one module so accelerate (DDP) syncs every trained
    gradient: the denoiser, and the text encoder when it trains (given `token_ids`, its output becomes
    the text conditioning; a frozen encoder's output comes ready in the conditioning)."""

    def __init__(self, denoiser: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.text_encoder = text_encoder

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, conditioning: Conditioning | torch.Tensor | None,
                token_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_ids is not None:
            conditioning = Conditioning(text=self.text_encoder(token_ids)[0])
        return self.denoiser(x_t, t, conditioning)


class CaptionTokens:
    """Captions -> token ids, each caption dropped to the empty prompt with chance `dropout` (what
    classifier-free guidance needs: the empty prompt is the unconditional one, as in Stable Diffusion).
    Captions longer than the tokenizer's limit are truncated, and counted in one warning per run."""

    def __init__(self, prompts: PromptEncoder, dropout: float):
        self.tokenizer = prompts.tokenizer
        self.dropout = dropout
        self.seen_long: set[str] = set()

    def __call__(self, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        return self.token_ids(self.drop(captions, generator))

    def drop(self, captions: list[str], generator: torch.Generator) -> list[str]:
        """The captions, each replaced by the empty one with chance `dropout` (one draw per caption)."""
        dropped = (torch.rand(len(captions), generator=generator) < self.dropout).tolist()
        return ["" if d else c for c, d in zip(captions, dropped)]

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        captions = expand_tokens(captions, self.tokenizer)  # a learnt token of several vectors: all of them
        return self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def check_lengths(self, captions: list[str]) -> int:
        """Count (and warn once about) the captions the tokenizer must truncate; returns the count."""
        limit = self.tokenizer.model_max_length
        unique = list(dict.fromkeys(captions))
        lengths = self.tokenizer(unique).input_ids
        long = {c for c, ids in zip(unique, lengths) if len(ids) > limit}
        count = sum(c in long for c in captions)
        if count:
            example = max(long, key=len)
            log.warning("%d of %d captions are longer than the tokenizer's %d tokens and are truncated in training "
                        "(the longest: %r)", count, len(captions), limit, example[:80] + "..." * (len(example) > 80))
        return count


class PromptCache:
    """A frozen text encoder's embeddings of a run's distinct captions, computed once before training (in
    batches of PROMPT_BATCH) and looked up by caption at each step, as diffusers' DreamBooth script does
    with --pre_compute_text_embeddings. Built only when they take at most PROMPT_CACHE_SHARE of the
    device's free memory (a data set with a caption per image computes them at each step instead)."""

    def __init__(self, rows: dict[str, int], embeddings: torch.Tensor):
        self.rows = rows
        self.embeddings = embeddings

    @classmethod
    @torch.no_grad()
    def build(cls, captions: list[str], text_encoder, tokens: CaptionTokens) -> PromptCache | None:
        device = next(text_encoder.parameters()).device
        config = text_encoder.config
        size = tokens.tokenizer.model_max_length * config.hidden_size * text_encoder.dtype.itemsize
        if len(captions) * size > free_memory(device) * PROMPT_CACHE_SHARE:
            return None
        parts = [text_encoder(tokens.token_ids(captions[i:i + PROMPT_BATCH]).to(device))[0]
                 for i in range(0, len(captions), PROMPT_BATCH)]
        return cls({c: i for i, c in enumerate(captions)}, torch.cat(parts))

    def __call__(self, captions: list[str]) -> torch.Tensor:
        index = torch.tensor([self.rows[c] for c in captions], device=self.embeddings.device)
        return self.embeddings[index]


class CachedLatents:
    """A dataset's images as the VAE's posterior (mean and std per latent), computed once before
    training; each batch draws its latents from it with the run's noise generator, as encoding on the
    fly would. With flips the mirrored images are encoded too. Looks like the dataset to a BatchStream."""

    def __init__(self, data, codec, flip: bool, device):
        self.data = data
        self.scale = codec.scaling_factor
        self.mean, self.std = self._encode(data, codec, False, device)
        self.flipped = self._encode(data, codec, True, device) if flip else None

    @staticmethod
    @torch.no_grad()
    def _encode(data, codec, flip: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        distinct, position = distinct_images(data)
        n = len(distinct)
        step = vae_batch(data.image_size, data.image_size, codec.dtype, device, ENCODE_BATCH, decode=False)
        bar = progress_bar(total=n, unit="image", desc="caching latents" + (" (mirrored)" if flip else ""))
        for start in range(0, n, step):
            index = distinct[start:start + step]
            images = data.batch(index, torch.ones(len(index), dtype=torch.bool) if flip else None)["images"]
            posterior = codec.vae.encode(images.to(device, codec.dtype)).latent_dist
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
            bar.update(len(index))
        bar.close()
        return torch.cat(means)[position], torch.cat(stds)[position]

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices: torch.Tensor, flips: torch.Tensor | None = None) -> dict:
        mean, std = self.mean[indices], self.std[indices]
        if flips is not None and self.flipped is not None and bool(flips.any()):
            m = flips[:, None, None, None]
            mean = torch.where(m, self.flipped[0][indices], mean)
            std = torch.where(m, self.flipped[1][indices], std)
        captions = mirrored_captions(pick(self.data.captions, indices), flips, self.data.mirror_caption)
        out = {"latent_mean": mean, "latent_std": std, "captions": captions}
        return with_groups(out, getattr(self.data, "loss_groups", None), indices)

    def read_ahead(self, plan) -> None:
        pass

    def close(self) -> None:
        self.data.close()


def distinct_images(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the dataset's distinct images, each image's place among them), so that a dataset that
    repeats its images is encoded once per image: textual inversion pairs each image with every caption
    template (27 of them), which at 512 px on a CPU is minutes per repeat. Images held on disk (streamed
    datasets) are taken as they come."""
    images = getattr(data, "images", None)
    if not isinstance(images, torch.Tensor):
        everything = torch.arange(len(data))
        return everything, everything
    first: dict[bytes, int] = {}
    position = []
    for i in range(images.shape[0]):
        key = hashlib.blake2b(images[i].contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
        position.append(first.setdefault(key, len(first)))
    distinct = torch.empty(len(first), dtype=torch.long)
    for i, place in enumerate(position):
        distinct[place] = i  # any one of the copies: they are the same image
    return distinct, torch.tensor(position, dtype=torch.long)


def sample_latents(batch: dict, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents drawn from a cached posterior."""
    mean = batch["latent_mean"]
    noise = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
    return (mean + batch["latent_std"] * noise) * scale
