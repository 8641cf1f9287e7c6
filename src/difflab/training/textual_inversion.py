"""Textual inversion: teach a text-to-image model a new word (`<my-thing>`) from a few images, learning only
that word's embedding rows (Gal et al. 2022; diffusers' examples/textual_inversion/textual_inversion.py).

Not a loop of its own: the one Trainer fine-tuning a text-to-image model (`--model`) with
- a data maker: the images of `--data`, each captioned with every template of diffusers' script ("a photo
  of a {}", ... for an object; "a painting in the style of {}", ... for a style) filled with the token, so
  that the batch stream's shuffle draws a random template for each image as the script does;
- a choice of trainable parameters (`NewTokenRows`): the token (and `<tok>_1`, ... with --num-vectors)
  added to the tokenizer, its rows added to the text encoder's embedding starting from --init-word's, and
  every other weight frozen. The rows are the only parameter the optimizer sees, so every other row of
  the embedding stays exactly as it was (diffusers' script trains the whole matrix and copies the other
  rows back after each step: the same updates of the new rows, as AdamW works element by element), and
  a checkpoint holds only the new rows and their optimizer state.
The run's model is `learned_embeds.safetensors` ({token: rows}, the file diffusers'
`load_textual_inversion` reads) with a model card.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from difflab.config import TextualInversionConfig
from difflab.data.dataset import ImageDataset
from difflab.errors import ConfigError, DataError, ModelError
from difflab.models.embeddings import EMBEDDING_FILE, add_token_rows
from difflab.models.model import DiffusionModel
from difflab.training.run_folder import RunFolder

log = logging.getLogger("difflab")

# diffusers' examples/textual_inversion/textual_inversion.py: imagenet_templates_small, imagenet_style_templates_small
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
MOST_IMAGES = 1000  # refused above: that is fine-tuning on a data set


# ---- settings ------------------------------------------------------------------------------------

def check_settings(config: TextualInversionConfig) -> TextualInversionConfig:
    """The settings that must be given, each with a one-line error."""
    t = config.textual_inversion
    if not config.model.base:
        raise ConfigError("give the text-to-image model to teach with --model (a Stable Diffusion folder, a difflab "
                          "text-to-image run or model folder, or a Hub id)")
    if not config.data.spec or config.data.spec == "digits":
        raise ConfigError("give the folder of the subject's (or style's) images with --data FOLDER")
    if not (t.token or "").strip() or any(c.isspace() for c in t.token):
        raise ConfigError('give the new token with --token, one word without spaces such as "<my-thing>"')
    if not (t.init_word or "").strip():
        raise ConfigError("give --init-word: a word the model knows for what the images show (dog, shape, painting); "
                          "the new token starts from its embedding")
    if config.model.lora_rank or config.model.train_text_encoder:
        raise ConfigError("textual inversion trains only the new token's embedding: leave out --lora-rank and "
                          "--train-text-encoder")
    return config


def placeholder(token: str, num_vectors: int) -> list[str]:
    """The tokens added for `token`: diffusers' names, `<tok>`, `<tok>_1`, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def init_token_id(tokenizer, word: str) -> int:
    """The id of --init-word, which must be one token (as diffusers' script requires)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = " + ".join(tokenizer.convert_ids_to_tokens(ids)) or "nothing"
        raise ConfigError(f"--init-word {word!r} is {len(ids)} tokens to this model's tokenizer ({pieces}), not one; "
                          "give a word it holds whole")
    return ids[0]


# ---- the run's data ---------------------------------------------------------------------------------

def make_data(config: TextualInversionConfig, base: DiffusionModel, run: RunFolder) -> ImageDataset:
    """Every image with every caption template of --what, filled with the token."""
    from difflab.data.folder import load_folder
    from difflab.training.dreambooth import count_images

    t, folder = config.textual_inversion, config.data.spec
    if base.prompts is None:
        raise DataError(f"{config.model.base} has no text encoder: textual inversion teaches text-to-image models")
    count = count_images(folder, "--data", "textual inversion")
    if count > MOST_IMAGES:
        raise DataError(f"--data {folder} holds {count} images, more than the {MOST_IMAGES} textual inversion takes; "
                        "to learn from a data set use difflab finetune")
    images = load_folder(folder, base.info.image_size, 3, "all", memory_limit_mb=1 << 30).images
    templates = TEMPLATES[t.what]
    captions = [template.format(t.token) for _ in range(len(images)) for template in templates]
    notes = {"images": len(images), "token": t.token, "init_word": t.init_word, "num_vectors": t.num_vectors,
             "what": t.what, "templates": len(templates)}
    return ImageDataset(images.repeat_interleave(len(templates), dim=0), source=folder, captions=captions,
                        notes=notes)


# ---- what trains -------------------------------------------------------------------------------------

class TokenEmbedding(nn.Module):
    """The text encoder's token embedding with the new tokens' rows as a parameter of their own: ids
    first..first+n-1 read `rows`, every other id the frozen embedding."""

    def __init__(self, frozen: nn.Embedding, first: int, rows: torch.Tensor):
        super().__init__()
        self.frozen = frozen.requires_grad_(False)
        self.first = first
        self.rows = nn.Parameter(rows.detach().clone())

    @property
    def weight(self) -> torch.Tensor:  # what transformers reads of an embedding (its width, dtype, device)
        return self.frozen.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.frozen(ids)
        new = (ids >= self.first) & (ids < self.first + len(self.rows))
        picked = self.rows[(ids - self.first).clamp(0, len(self.rows) - 1)].to(out.dtype)
        return torch.where(new[..., None], picked, out)

    def write_back(self) -> None:
        """The learnt rows into the plain embedding (for a model used after training)."""
        with torch.no_grad():
            self.frozen.weight[self.first:self.first + len(self.rows)] = self.rows.to(self.frozen.weight.dtype)


class NewTokenRows:
    """Textual inversion's choice of trainable parameters (a `TrainedPart` of the trainer)."""

    text_encoder_in_step = True

    def __init__(self, config: TextualInversionConfig, model: DiffusionModel):
        t, prompts = config.textual_inversion, model.prompts
        if prompts is None:
            raise ModelError(f"{config.model.base} has no text encoder: textual inversion teaches text-to-image models")
        self.token, self.tokens = t.token, placeholder(t.token, t.num_vectors)
        vocabulary = prompts.tokenizer.get_vocab()
        taken = [token for token in self.tokens if token in vocabulary]
        if taken:
            raise ConfigError(f"--token {taken[0]!r} is already in the tokenizer of {config.model.base}; choose a new "
                              'string, such as "<my-thing>"')
        init = init_token_id(prompts.tokenizer, t.init_word)
        for network in model.modules():
            network.requires_grad_(False)
        start = prompts.text_encoder.get_input_embeddings().weight[init].detach().clone()
        ids = add_token_rows(prompts, self.tokens, start.expand(len(self.tokens), -1))
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ModelError(f"the tokenizer gave the new tokens ids {ids}, not consecutive ones")
        self.embedding = TokenEmbedding(prompts.text_encoder.get_input_embeddings(), ids[0], start.expand(len(ids), -1))
        prompts.text_encoder.set_input_embeddings(self.embedding)
        log.info("textual inversion: %s (%d vector%s) from %r; every other weight frozen", self.token, len(ids),
                 "s" * (len(ids) > 1), t.init_word)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rows": self.embedding.rows.detach()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embedding.rows.copy_(tensors["rows"])

    def learned_embeds(self) -> dict[str, torch.Tensor]:
        """What diffusers' script saves: {token: rows [num_vectors, width]}."""
        return {self.token: self.embedding.rows.detach().float().cpu().clone()}

    def save(self, folder: Path, model: DiffusionModel) -> None:
        """learned_embeds.safetensors and its card, replacing `folder` only once complete."""
        from safetensors.torch import save_file

        from difflab.files import atomic_folder
        from difflab.storage.card import textual_inversion_card

        self.embedding.write_back()
        training = model.info.training
        with atomic_folder(folder) as partial:
            save_file(self.learned_embeds(), str(partial / EMBEDDING_FILE), metadata={"format": "pt"})
            (partial / "README.md").write_text(textual_inversion_card(
                str(folder), str(model.info.base_model), token=self.token, training=training), encoding="utf-8")


# ---- the command ------------------------------------------------------------------------------------

def textual_inversion(config: TextualInversionConfig, out: str | Path, *, resume: bool = False,
                      overwrite: bool = False, clock: Callable[[], float] = time.perf_counter,
                      after_step=None, yes: bool = False) -> Path:
    """Teach the base model (`config.model.base`) the token; returns the folder of learned_embeds.safetensors.
    The one training run with textual inversion's data maker and trained part."""
    from difflab.training.trainer import train

    config = check_settings(dataclasses.replace(config))
    return train(config, out, resume=resume, overwrite=overwrite, clock=clock, yes=yes, data=make_data,
                 trained=NewTokenRows, after_step=after_step)
