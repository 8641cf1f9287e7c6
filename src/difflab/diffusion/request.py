"""One generation request, checked and prepared before any work is done: which conditioning each
image gets (class labels, or prompts and negative prompts), which images the run starts from, at
what size and strength. Every mistake is a one-line `InputError` raised here, before sampling."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path

import torch

from difflab.diffusion.cfg import ClassifierFreeGuidance, guidance_of
from difflab.diffusion.inputs import check_size, depth_tensor, image_tensor, mask_tensor, read_image
from difflab.diffusion.modes import Prepared, Start
from difflab.errors import InputError
from difflab.models.conditioning import Conditioning
from difflab.models.model import DiffusionModel
from difflab.models.prompt_syntax import check_blends
from difflab.models.text import PromptEncoder, mix

log = logging.getLogger("difflab")
DEFAULT_STRENGTH = 0.8  # img2img and depth-to-image, as in diffusers; inpainting starts from noise (1.0)
DEFAULT_NOISE_LEVEL = 20  # the ×4 upscaler's, as in diffusers
MAX_SEED = 2 ** 64 - 1  # the largest seed torch.Generator.manual_seed takes


@dataclass
class Job:
    model: DiffusionModel
    inputs: Prepared
    cfg_scale: float
    labels: torch.Tensor | None = None  # one per image
    text: PromptPlan | None = None  # text models: what each image's prompt embeddings are made from
    guidance: ClassifierFreeGuidance | None = None  # the scale above, its interval and rescale (diffusion/cfg.py)

    def conditioning(self, first: int, n: int, begin: Start) -> tuple[Conditioning, Conditioning | None]:
        """The conditioning of images first..first+n and its unconditional twin (None: no guidance)."""
        device = self.model.device
        maps = Conditioning(channels=begin.channels, noise_level=begin.noise_level)
        if self.text is not None:
            conditioning = maps.replace(text=self.text.embeddings(first, n))
            if self.cfg_scale == 1.0:
                return conditioning, None
            return conditioning, conditioning.replace(text=self.text.embeddings(first, n, negative=True))
        if self.labels is not None:
            labels = self.labels[first:first + n].to(device)
            conditioning = maps.replace(labels=labels)
            if self.cfg_scale == 1.0:
                return conditioning, None
            return conditioning, maps.replace(labels=torch.full_like(labels, self.model.denoiser.null_class))
        return maps, None


@dataclass
class PromptPlan:
    """A request's prompt embeddings, made batch by batch: from prompts (in A1111's syntax, blended with
    `blends`) or given as tensors; the negative ones likewise. Every sequence of the request is as long
    as its longest (padded with the empty prompt's embeddings), so batching never changes an image."""

    encoder: PromptEncoder
    length: int  # tokens of every sequence
    long: bool  # the UNet takes sequences longer than one chunk
    prompts: list[str] | None = None  # one per image
    negatives: list[str] | None = None  # one per image
    blends: list[tuple[str, float]] = field(default_factory=list)
    embeds: torch.Tensor | None = None  # given: [1 or count, L, D]
    negative_embeds: torch.Tensor | None = None

    def embeddings(self, first: int, n: int, negative: bool = False) -> torch.Tensor:
        given = self.negative_embeds if negative else self.embeds
        if given is not None:
            chosen = given[first:first + n] if len(given) > 1 else given.expand(n, -1, -1)
            return self.encoder.pad(chosen.to(self.encoder.device), self.length)
        texts = (self.negatives if negative else self.prompts)[first:first + n]
        embeddings = self.encoder.encode(texts, self.length, self.long)
        if negative or not self.blends:
            return embeddings
        others = [(self.encoder.encode([prompt], self.length, self.long).expand(n, -1, -1), weight)
                  for prompt, weight in self.blends]
        return mix(embeddings, others)


def per_image(value: str | Sequence[str] | None, count: int, what: str) -> list[str] | None:
    if value is None or isinstance(value, str):
        return None if value is None else [value] * count
    value = list(value)
    if len(value) == 1:
        return value * count
    if len(value) != count:
        raise InputError(f"{len(value)} {what}s for {count} images: give one, or one per image")
    return value


def prepare(model: DiffusionModel, count: int, *, class_labels=None, prompts=None, negative_prompt=None,
            cfg_scale=None, cfg_interval=None, cfg_rescale=None,
            image=None, mask=None, depth=None, strength=None, noise_level=None,
            width=None, height=None, blend=None, prompt_embeds=None, negative_prompt_embeds=None,
            seed: int | None = None) -> Job:
    guidance = guidance_of(model, cfg_scale, cfg_interval, cfg_rescale)
    check_settings(seed=seed, count=count, strength=strength, width=width, height=height)
    prompts, negatives = per_image(prompts, count, "prompt"), per_image(negative_prompt, count, "negative prompt")
    embedded = prompt_embeds is not None or negative_prompt_embeds is not None
    if embedded and model.prompts is None:
        raise InputError("prompt embeddings need a text-to-image model; this model has no text encoder")
    check_conditioning(model, class_labels, [""] if embedded and prompts is None else prompts, negatives, count)
    if blend and model.prompts is None:
        raise InputError("a blend mixes prompts: it needs a text-to-image model")
    text = None
    if model.prompts is not None:
        text = plan_prompts(model, count, prompts, negatives, blend, prompt_embeds, negative_prompt_embeds)
    inputs = prepare_inputs(model, image, mask, depth, strength, noise_level, width, height)
    return Job(model, inputs, guidance.scale, class_labels, text, guidance)


def plan_prompts(model: DiffusionModel, count: int, prompts, negatives, blend, embeds, negative_embeds) -> PromptPlan:
    """Check the prompts (syntax, blends, given embeddings) and measure them, before any work: a prompt the
    model must cut is said here, before the progress bar starts."""
    encoder = model.prompts
    long = model.denoiser.takes_long_context
    blends = check_blends(list(blend or []))
    if embeds is not None and (prompts is not None or blends):
        raise InputError("give prompts or prompt embeddings, not both (to blend embeddings, mix them yourself: "
                         "docs/stable-diffusion.md)")
    embeds = checked_embeddings(embeds, count, encoder, "prompt_embeds")
    negative_embeds = checked_embeddings(negative_embeds, count, encoder, "negative_prompt_embeds")
    if negative_embeds is not None and negatives is not None:
        raise InputError("give a negative prompt or negative prompt embeddings, not both")
    if embeds is None and negative_embeds is not None:
        raise InputError("negative prompt embeddings need prompt embeddings (prompt_embeds) beside them")
    if negative_embeds is None:
        negatives = negatives or [""] * count
    texts = list(dict.fromkeys((prompts or []) + (negatives or []) + [prompt for prompt, _ in blends]))
    lengths = [encoder.length(text, long) for text in texts]
    lengths += [e.shape[1] for e in (embeds, negative_embeds) if e is not None]
    if not long:
        encoder.warn_truncated(texts)
    return PromptPlan(encoder, max(lengths), long, prompts, negatives, blends, embeds, negative_embeds)


def checked_embeddings(embeds, count: int, encoder: PromptEncoder, name: str) -> torch.Tensor | None:
    """Given prompt embeddings: [L, D] or [1 or count, L, D] finite floats, D the text encoder's width."""
    if embeds is None:
        return None
    width = encoder.text_encoder.config.hidden_size
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        raise InputError(f"{name} must be a float tensor [images, tokens, {width}] (got {type(embeds).__name__})")
    embeds = embeds[None] if embeds.dim() == 2 else embeds
    if embeds.dim() != 3 or embeds.shape[-1] != width or len(embeds) not in (1, count) or embeds.shape[1] == 0:
        raise InputError(f"{name} has shape {list(embeds.shape)}: this model takes [1 or {count}, tokens, {width}]")
    if not torch.isfinite(embeds).all():
        raise InputError(f"{name} holds values that are not finite numbers (NaN or infinity)")
    return embeds.detach()


# ---- checks that need no model (the CLI makes them before loading one) ------------------------------

def check_settings(*, seed: int | None = None, count: int = 1, strength=None, width=None, height=None) -> None:
    """The request's numbers, before anything is loaded: a seed torch's generators take for every image,
    a strength in (0, 1], sides of at least one pixel."""
    if seed is not None and not (isinstance(seed, Integral) and 0 <= seed and seed + max(count, 1) - 1 <= MAX_SEED):
        last = "" if count <= 1 else f" (image i uses SEED+i, so with {count} images at most {MAX_SEED - count + 1})"
        raise InputError(f"--seed must be a whole number from 0 to {MAX_SEED}{last}; got {seed}")
    if strength is not None and not (math.isfinite(strength) and 0 < strength <= 1):
        raise InputError(f"--strength must be in (0, 1] (got {strength}): it is how much of --image is repainted, "
                         "1 everything, 0.3 a little (most of the image is kept)")
    for name, side in (("width", width), ("height", height)):
        if side is not None and side < 1:
            raise InputError(f"--{name} must be a positive number of pixels (got {side})")


def check_outputs(outputs, inputs: dict, out_dir=None, first_seed: int = 0) -> None:
    """No output may replace an input (`--out photo.png --image photo.png` would overwrite the user's
    photo with the result). `outputs`: (flag, path) of the files a run writes; `inputs`: {what: path or
    None}; `out_dir`: (flag, folder) where image i is written as f"{first_seed + i:06d}.png". Compared
    as resolved paths (links followed), and as the same file where both exist (hard links)."""
    import os
    import re

    from difflab.errors import OutputError

    given = {what: Path(path).expanduser() for what, path in inputs.items() if isinstance(path, (str, os.PathLike))}

    def refuse(flag, out, what):
        raise OutputError(f"{flag} {out} would replace the {what} given as input; give another {flag} (the input "
                          "is never overwritten)")

    for flag, out in outputs:
        out = Path(out).expanduser()
        for what, path in given.items():
            if out.resolve() == path.resolve() or (out.exists() and path.exists() and os.path.samefile(out, path)):
                refuse(flag, out, what)
    if out_dir is not None:
        flag, folder = out_dir[0], Path(out_dir[1]).expanduser().resolve()
        for what, path in given.items():
            path = path.resolve()
            if path.parent == folder and re.fullmatch(r"\d{6,}\.png", path.name) and int(path.stem) >= first_seed:
                refuse(flag, out_dir[1], f"{what} {path.name}")


def check_conditioning(model: DiffusionModel, labels, prompts, negatives, count: int) -> None:
    if model.prompts is None and (prompts is not None or negatives is not None):
        raise InputError("this model has no text encoder, so it takes no prompt; "
                         + ("give --class instead" if model.class_names else "it samples without conditioning"))
    if model.prompts is not None and labels is not None:
        raise InputError("this is a text-to-image model: it takes a prompt (--prompt), not a class")
    if model.prompts is not None and prompts is None:
        raise InputError("this is a text-to-image model: give a prompt (--prompt \"a photo of ...\")")
    if labels is not None and len(labels) != count:
        raise InputError(f"{len(labels)} class labels for {count} images: give one per image")


def mode_of(model: DiffusionModel, image, mask) -> str:
    """What a request does: txt2img, img2img, inpaint, depth or upscale (an inpainting, depth or upscaling
    model does only its own; any other model inpaints with a mask and repaints an image without one)."""
    if model.variant is not None:
        return model.variant
    if image is None:
        return "txt2img"
    return "inpaint" if mask is not None else "img2img"


def strength_of(mode: str, strength: float | None) -> float | None:
    """The strength a request runs at — how much of its image is repainted, 1 everything — as given or
    the mode's default; None for a mode that has none (text-to-image, the upscaler)."""
    if mode in ("txt2img", "upscale"):
        return None
    if strength is not None:
        return strength
    return 1.0 if mode == "inpaint" else DEFAULT_STRENGTH


def check_inputs(model: DiffusionModel, *, image=None, mask=None, depth=None, strength=None, noise_level=None,
                 width=None, height=None, depth_model=None) -> None:
    """Which inputs this model takes, from the request alone (no file read, nothing downloaded): the
    CLI makes this check as soon as the model is loaded, before LoRAs or a depth estimator are fetched."""
    variant = model.variant
    check_settings(strength=strength, width=width, height=height)
    for name, value, needs in (("mask", mask, "inpainting"), ("depth map", depth, "depth-to-image")):
        if value is not None and image is None:
            raise InputError(f"a {name} needs the image it belongs to: give --image too ({needs} repaints an image)")
    if image is None and variant is not None:
        raise InputError(f"this is a {model.kind.pipeline} model: it needs an input image (--image)"
                         + (" and a mask (--mask)" if variant == "inpaint" else ""))
    if variant == "inpaint" and mask is None:
        raise InputError("this is an inpainting model: give --mask (white where the image is repainted)")
    for name, value in (("a depth map", depth), ("--depth-model", depth_model)):
        if value is not None and variant != "depth":
            raise InputError(f"{name} is for depth-to-image models (a StableDiffusionDepth2ImgPipeline folder); "
                             f"this is {what_model(model)}, which takes none")
    if mask is not None and variant in ("depth", "upscale"):
        raise InputError(f"a {model.kind.pipeline} model does not inpaint; give no --mask")
    if noise_level is not None and variant != "upscale":
        raise InputError("--noise-level is for the ×4 upscaler (a StableDiffusionUpscalePipeline folder)")
    if strength is not None and (image is None or variant == "upscale"):
        raise InputError("--strength is how much of --image is repainted (1: everything): it needs an image, and "
                         "the upscaler takes none (it uses --noise-level)")
    if variant == "upscale":
        if width is not None or height is not None:
            raise InputError("the upscaler's output size is its input's × 4: give no --width/--height")
        highest = model.max_noise_level if model.max_noise_level is not None else 350
        level = DEFAULT_NOISE_LEVEL if noise_level is None else noise_level
        if not 0 <= level <= highest:
            raise InputError(f"--noise-level {level} is outside what this upscaler takes: 0 to {highest}")


def what_model(model: DiffusionModel) -> str:
    if model.variant is not None:
        return f"a {model.kind.pipeline} model"
    return "a text-to-image model" if model.prompts is not None else "a pixel model"


def prepare_inputs(model: DiffusionModel, image, mask, depth, strength, noise_level, width, height) -> Prepared:
    check_inputs(model, image=image, mask=mask, depth=depth, strength=strength, noise_level=noise_level,
                 width=width, height=height)
    variant = model.variant
    if variant == "upscale":
        return prepare_upscale(model, image, noise_level)
    source = read_image(image, "image") if image is not None else None
    width, height = output_size(model, source, width, height)
    channels = model.info.channels if model.codec is None else 3
    prepared = Prepared(model.sample_shape(height, width))
    if source is not None:
        prepared.image = image_tensor(source, width, height, channels)
        prepared.strength = strength_of(mode_of(model, image, mask), strength)
    if mask is not None:
        prepared.mask = mask_tensor(read_image(mask, "mask"), source, width, height)
        check_mask(prepared.mask, mask, prepared.strength)
    if variant == "depth":
        prepared.depth = depth_tensor(depth) if depth is not None else estimate_depth(model, source)
    return prepared


def check_mask(mask: torch.Tensor, given, strength: float) -> None:
    """A mask as it will be used (binarised at the output size): all black repaints nothing, refused;
    all white repaints everything, said once."""
    name = f" {given}" if isinstance(given, (str, Path)) else ""
    if not bool(mask.any()):
        raise InputError(f"the mask{name} is all black: nothing would be repainted; paint white where the image "
                         "should be repainted")
    if bool(mask.all()):
        height, width = mask.shape[-2:]
        what = (f"this is text-to-image at the image's size, {width}×{height}" if strength >= 1 else
                f"this is img2img at strength {strength:g}")
        log.info("the mask%s is all white: the whole image is repainted, so %s", name, what)


def output_size(model: DiffusionModel, source, width, height) -> tuple[int, int]:
    """The asked size; else the input image's, rounded down to what the model takes (said when it
    changes); else the model's."""
    factor = model.size_factor
    if source is not None and width is None and height is None:
        width, height = fitted_size(source, factor)
        if (width, height) != source.size:
            log.info("the image is %d×%d and this model takes sides that are multiples of %d: it is resized to "
                     "%d×%d (give --width and --height to choose)", *source.size, factor, width, height)
    width = model.info.image_size if width is None else width
    height = model.info.image_size if height is None else height
    check_size(width, height, factor)
    return width, height


def planned_size(model: DiffusionModel, image=None, width=None, height=None) -> tuple[int, int]:
    """The (width, height) a request's images will have, for the workload estimate before sampling: the
    upscaler's input × 4; else as `output_size` decides (the asked size, the input image's, the model's)."""
    if model.variant == "upscale" and image is not None:
        source = read_image(image, "image")
        factor = model.codec.factor
        return tuple(side * factor for side in fitted_size(source, factor))
    source = read_image(image, "image") if image is not None else None
    if source is not None and width is None and height is None:
        return fitted_size(source, model.size_factor)
    return (model.info.image_size if width is None else width, model.info.image_size if height is None else height)


def fitted_size(image, factor: int) -> tuple[int, int]:
    """An image's width and height rounded down to multiples of `factor` (as diffusers' processors do)."""
    return tuple(max(factor, side // factor * factor) for side in image.size)


def prepare_upscale(model: DiffusionModel, image, noise_level) -> Prepared:
    level = DEFAULT_NOISE_LEVEL if noise_level is None else noise_level
    source = read_image(image, "image")
    factor = model.codec.factor
    if min(source.size) < factor:
        raise InputError(f"the image {source.width}×{source.height} is too small for the ×4 upscaler: it takes "
                         f"sides of at least {factor} pixels (multiples of {factor})")
    width, height = fitted_size(source, factor)
    if (width, height) != source.size:
        log.warning("the upscaler takes sides that are multiples of %d: the %d×%d image is resized to %d×%d, so "
                    "the result is %d×%d, not %d×%d (crop it to multiples of %d for exactly ×4)", factor,
                    *source.size, width, height, width * factor, height * factor, source.width * factor,
                    source.height * factor, factor)
    low_res = image_tensor(source, width, height, resample="bicubic")
    return Prepared(model.sample_shape(height * factor, width * factor), image=low_res, noise_level=level)


def estimate_depth(model: DiffusionModel, source) -> torch.Tensor:
    if model.depth_estimator is None:
        raise InputError("depth-to-image needs a depth map: give --depth DEPTH.png, or --depth-model PATH_OR_ID "
                         "(a transformers depth estimator such as Intel/dpt-hybrid-midas)")
    from difflab.models.depth import predict_depth

    return predict_depth(model.depth_estimator, source, model.device)
