"""A new text-to-image model for `difflab train --conditioning text`: what it is given, loaded; what it
is not, made in the run folder.

- the VAE: `--vae` (frozen), or the run's VAE stage (training/autoencoder.py, `vae/`);
- the tokenizer and text encoder: `--text-encoder` (frozen unless --train-text-encoder), or a
  tokenizer learnt from the captions (`tokenizer/`) and a new `CLIPTextModel`, trained with the UNet;
- the UNet: a `UNet2DConditionModel` of the preset's size, on the VAE's latents, attending to the
  text encoder's output.

The result is the same model container every other model is (a denoiser, its noise schedule, a latent
codec, a prompt encoder), so the trainer, the sampler and `save_model` treat it as they treat any.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difflab.diffusion.cfg import TRAINED_TEXT_GUIDANCE
from difflab.errors import ModelError, RunFolderError
from difflab.models.codec import LatentCodec
from difflab.models.denoiser import Denoiser
from difflab.models.model import DiffusionModel, ModelInfo
from difflab.models.text import PromptEncoder
from difflab.models.text_presets import TextPreset, text_preset
from difflab.storage.text_encoder import load_text_encoder
from difflab.training.run_folder import TOKENIZER

if TYPE_CHECKING:
    from difflab.training.autoencoder import VaeReport

log = logging.getLogger("difflab")

TOKENIZER_FOLDER = TOKENIZER  # in the run folder
PIXEL_SPACE = "none"  # --vae none
MAX_TOKENS = 77  # CLIP's; a tokenizer learnt here is shorter when the captions are (see prompt_length)


@dataclass
class TextModelParts:
    model: DiffusionModel
    train_text_encoder: bool
    vae_report: VaeReport | None  # of the VAE stage, when the run trained the VAE

    def training_rows(self, config, data) -> dict:
        """What difflab.json and the model card say of the text parts of a run."""
        rows = {}
        m = config.model
        if not m.base:  # a new model: where its VAE and text encoder came from
            steps = self.vae_report.steps if self.vae_report and self.vae_report.steps else config.vae.steps
            rows["vae"] = m.vae or f"trained here ({steps} steps)"
            if self.vae_report and self.vae_report.psnr is not None:
                rows["vae_psnr"] = self.vae_report.psnr
            rows["text_encoder"] = m.text_encoder or "trained here, with the UNet"
        rows["text_encoder_trained"] = self.train_text_encoder
        rows["captions"] = len(set(data.captions))
        if config.data.caption_template:
            rows["caption_template"] = config.data.caption_template
        return rows


@dataclass
class GivenParts:
    """What a new text model is given rather than made: --text-encoder (tokenizer, text encoder) and --vae."""

    text: tuple | None
    vae: object | None


def given_text_parts(config, data) -> GivenParts:
    """The given text encoder and VAE, loaded, and the image size checked against the VAE's factor (the
    given VAE's, or the one this run would train) and the UNet's levels: all before the run folder is
    written and before a VAE stage trains for minutes."""
    m = config.model
    preset = text_preset(m.preset)
    text = load_text_encoder(m.text_encoder, f"--text-encoder {m.text_encoder}") if m.text_encoder else None
    if (m.vae or "").lower() == PIXEL_SPACE:  # the UNet works on the images: what the latent space buys is
        check_image_size(data.image_size, unet_factor(preset), "the UNet")  # measured against this
        return GivenParts(text, None)
    vae = load_vae(m.vae) if m.vae else None
    codec = LatentCodec(vae) if vae is not None else None
    check_sizes(data.image_size, codec.factor if codec else preset.vae_factor, preset,
                m.vae or "the VAE this run trains")
    return GivenParts(text, vae)


def unet_factor(preset: TextPreset) -> int:
    return 2 ** (len(preset.unet_channels) - 1)


def build_text_model(config, data, run_root: Path, accelerator, clock, given: GivenParts | None = None
                     ) -> TextModelParts:
    """The model a text run trains, with its VAE stage run first when it has no --vae."""
    from diffusers import UNet2DConditionModel

    from difflab.models.schedules import noise_scheduler

    m = config.model
    preset = text_preset(m.preset)
    given = given or given_text_parts(config, data)
    if given.text is not None:
        (tokenizer, text_encoder), trained_here = given.text, False
    else:
        tokenizer, text_encoder, trained_here = text_components(None, data.captions, run_root, preset,
                                                                config.run.seed)
    pixel = (m.vae or "").lower() == PIXEL_SPACE
    if pixel:  # the UNet works on the images themselves: what the latent space buys is measured against this
        codec, report = None, None
        side, channels = data.image_size, 3
    else:
        vae, report = (given.vae, None) if given.vae is not None else vae_component(config, data, run_root,
                                                                                     accelerator, preset, clock)
        vae.requires_grad_(False)
        codec = LatentCodec(vae)
        check_sizes(data.image_size, codec.factor, preset, m.vae or "the VAE")
        side, channels = data.image_size // codec.factor, codec.channels
    with torch.random.fork_rng():
        torch.manual_seed(config.run.seed)
        unet = UNet2DConditionModel.from_config({**preset.unet_config(side, channels),
                                                 "cross_attention_dim": text_encoder.config.hidden_size})
    info = ModelInfo(data.image_size, 3, data=data.source, guidance=dict(preset.guidance or TRAINED_TEXT_GUIDANCE))
    schedule = noise_scheduler(m.schedule, m.prediction, m.timesteps, latent=not pixel)
    model = DiffusionModel(Denoiser(unet), schedule, info, codec=codec, prompts=PromptEncoder(tokenizer, text_encoder))
    train_text = trained_here if m.train_text_encoder is None else m.train_text_encoder
    text_encoder.requires_grad_(train_text)
    return TextModelParts(model, train_text, report)


# ---- tokenizer and text encoder -----------------------------------------------------------------

def text_components(spec: str | None, captions: list[str], run_root: Path, preset: TextPreset, seed: int):
    """(tokenizer, text encoder, made here?)."""
    if spec:
        tokenizer, text_encoder = load_text_encoder(spec)
        return tokenizer, text_encoder, False
    tokenizer = run_tokenizer(captions, Path(run_root) / TOKENIZER_FOLDER)
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_config(
            len(tokenizer), tokenizer.model_max_length, tokenizer.bos_token_id, tokenizer.eos_token_id)))
    return tokenizer, text_encoder, True


def run_tokenizer(captions: list[str], folder: Path):
    """The run's tokenizer: learnt from the captions the first time, loaded from the run folder after."""
    from transformers import CLIPTokenizer

    from difflab.models.tokenizer import train_tokenizer

    if (folder / "tokenizer_config.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder))
    probe = train_tokenizer(captions, folder)  # to count the captions' tokens, then again at the length they need
    length = prompt_length(max(len(probe(c).input_ids) for c in set(captions) if c))
    tokenizer = train_tokenizer(captions, folder, model_max_length=length)
    log.info("learnt a %d-token vocabulary from the captions (prompts up to %d tokens) in %s", len(tokenizer),
             length, folder)
    return tokenizer


def prompt_length(longest_caption: int) -> int:
    """Room for the longest caption and some longer prompts, in multiples of 8; never past CLIP's 77. A
    shorter sequence makes the text encoder and the cross-attention cheaper."""
    return min(MAX_TOKENS, max(32, -(-(longest_caption * 3 // 2) // 8) * 8))


def tokenizer_fingerprint(tokenizer) -> str:
    """What a checkpoint records of its tokenizer: a resumed run must tokenize as the run did."""
    vocab = sorted(tokenizer.get_vocab().items())
    text = repr((vocab, tokenizer.model_max_length))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_tokenizer(saved: str | None, tokenizer, run_root: Path) -> None:
    if saved is not None and saved != tokenizer_fingerprint(tokenizer):
        raise RunFolderError(f"{run_root} was trained with another tokenizer (fingerprint {saved}, now "
                             f"{tokenizer_fingerprint(tokenizer)}); its token ids would mean other words: resume with "
                             "the run's own tokenizer/ and --text-encoder, or start a new run")


# ---- the VAE ------------------------------------------------------------------------------------

def vae_component(config, data, run_root: Path, accelerator, preset: TextPreset, clock):
    """(the VAE, its VaeReport when the run trained it)."""
    from difflab.training.autoencoder import VaeStage, finished_vae

    if config.model.vae:
        return load_vae(config.model.vae), None
    done = finished_vae(run_root)
    if done is not None:
        return done
    v = config.vae
    budget = f"{v.steps} steps" + (f" or {v.minutes:g} minutes, whichever ends first" if v.minutes else "")
    log.info("VAE stage: training an AutoencoderKL (latents ×%d smaller, %d channels) for %s",
             preset.vae_factor, preset.latent_channels, budget)
    return VaeStage(config, data, run_root, accelerator, preset, clock).run()


def load_vae(spec: str):
    from diffusers import AutoencoderKL

    path = Path(spec).expanduser()
    if path.exists() and not path.is_dir():
        raise ModelError(f"--vae {spec} is a file; give the folder that holds the VAE")
    nested = (path / "vae").is_dir() if path.is_dir() else True
    try:
        vae = AutoencoderKL.from_pretrained(str(path if path.is_dir() else spec), subfolder="vae" if nested else None,
                                            use_safetensors=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load an AutoencoderKL from {spec} ({reason}); give a Stable Diffusion folder or "
                         "a diffusers AutoencoderKL folder") from None
    scale = getattr(vae.config, "scaling_factor", None)
    if not isinstance(scale, (int, float)) or not 0 < scale < 1e3:
        raise ModelError(f"--vae {spec} has no usable latent scaling factor (scaling_factor = {scale!r}); set it "
                         "in its config.json (1 / std of its latents)")
    return vae.eval()


def check_image_size(image_size: int, factor: int, what: str) -> None:
    if image_size % factor:
        below, above = image_size // factor * factor, (image_size // factor + 1) * factor
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ModelError(f"image size {image_size} is not a multiple of {factor}, the factor {what} shrinks images "
                         f"by: use --image-size {nearest}")


def check_sizes(image_size: int, factor: int, preset: TextPreset, vae_name: str) -> None:
    """The VAE's factor divides the image, and the UNet's levels divide the latents."""
    check_image_size(image_size, factor, vae_name)
    levels = unet_factor(preset)
    latent = image_size // factor
    if latent % levels or latent < levels:
        raise ModelError(f"{vae_name} makes {latent}×{latent} latents of {image_size} px images, and the UNet halves "
                         f"them {len(preset.unet_channels) - 1} times, so they must be a multiple of {levels}: "
                         f"use --image-size {factor * levels * max(1, -(-latent // levels))}")
