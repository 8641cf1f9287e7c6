"""A checked `GenerationRequest` made ready to sample: which conditioning each image gets (class labels,
or prompt embeddings made batch by batch), which images the run starts from, at what size and strength.
Reading the input images happens here; the rules they must follow are the request's (request.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difflab.diffusion.cfg import ClassifierFreeGuidance
from difflab.diffusion.inputs import check_size, depth_tensor, image_tensor, mask_tensor, read_image
from difflab.diffusion.modes import Prepared, Start
from difflab.diffusion.request import GenerationRequest, checked_embeddings, per_image, size_step
from difflab.errors import InputError
from difflab.models.conditioning import Conditioning
from difflab.models.model import DiffusionModel
from difflab.models.prompt_syntax import check_blends
from difflab.models.text import PromptEncoder, mix

log = logging.getLogger("difflab")


@dataclass
class Job:
    model: DiffusionModel
    inputs: Prepared
    guidance: ClassifierFreeGuidance  # the scale, its interval of noise levels and rescale (diffusion/cfg.py)
    labels: torch.Tensor | None = None  # one per image
    text: PromptPlan | None = None  # text models: what each image's prompt embeddings are made from

    def conditioning(self, first: int, n: int, begin: Start) -> tuple[Conditioning, Conditioning | None]:
        """The conditioning of images first..first+n and its unconditional twin (None: no guidance)."""
        device = self.model.device
        maps = Conditioning(channels=begin.channels, noise_level=begin.noise_level)
        if self.text is not None:
            conditioning = maps.replace(text=self.text.embeddings(first, n))
            if self.guidance.scale == 1.0:
                return conditioning, None
            return conditioning, conditioning.replace(text=self.text.embeddings(first, n, negative=True))
        if self.labels is not None:
            labels = self.labels[first:first + n].to(device)
            conditioning = maps.replace(labels=labels)
            if self.guidance.scale == 1.0:
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


def prepare(model: DiffusionModel, request: GenerationRequest) -> Job:
    """`request`, checked against `model`, ready to sample: its input images read and its prompts measured."""
    request.check(model)
    labels = None if request.class_labels is None else torch.as_tensor(request.class_labels, dtype=torch.long)
    text = plan_prompts(model, request) if model.prompts is not None else None
    return Job(model, prepare_inputs(model, request), request.run_guidance(model), labels, text)


def plan_prompts(model: DiffusionModel, request: GenerationRequest) -> PromptPlan:
    """Measure the prompts before any work: a prompt the model must cut is said here, before the progress
    bar starts."""
    encoder, count = model.prompts, request.count
    long = model.denoiser.takes_long_context
    prompts = per_image(request.prompts, count, "prompt")
    negatives = per_image(request.negative_prompt, count, "negative prompt")
    blends = check_blends(list(request.blend or []))
    embeds = checked_embeddings(request.prompt_embeds, count, encoder, "prompt_embeds")
    negative_embeds = checked_embeddings(request.negative_prompt_embeds, count, encoder, "negative_prompt_embeds")
    if negative_embeds is None:
        negatives = negatives or [""] * count
    texts = list(dict.fromkeys((prompts or []) + (negatives or []) + [prompt for prompt, _ in blends]))
    lengths = [encoder.length(text, long) for text in texts]
    lengths += [e.shape[1] for e in (embeds, negative_embeds) if e is not None]
    if not long:
        encoder.warn_truncated(texts)
    return PromptPlan(encoder, max(lengths), long, prompts, negatives, blends, embeds, negative_embeds)


def prepare_inputs(model: DiffusionModel, request: GenerationRequest) -> Prepared:
    """Where sampling starts, with the input images read and fitted to the output size."""
    image, mask, depth = request.image, request.mask, request.depth
    if model.variant == "upscale":
        return prepare_upscale(model, image, request.run_noise_level(model))
    source = read_image(image, "image") if image is not None else None
    width, height = output_size(model, source, request.width, request.height)
    channels = model.info.channels if model.codec is None else 3
    prepared = Prepared(model.sample_shape(height, width))
    if source is not None:
        prepared.image = image_tensor(source, width, height, channels)
        prepared.strength = request.run_strength(model)
    if mask is not None:
        prepared.mask = mask_tensor(read_image(mask, "mask"), source, width, height)
        check_mask(prepared.mask, mask, prepared.strength)
    if model.variant == "depth":
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
    check_size(width, height, factor, step=size_step(model))
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


def prepare_upscale(model: DiffusionModel, image, level: int) -> Prepared:
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
