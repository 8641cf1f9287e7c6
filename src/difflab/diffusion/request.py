"""One generation request as a value: what to make (how many images, conditioned on what, from which
images, at what size), with which sampler, and how the networks run. Every front end builds one (the CLI,
the demo, the trainer's grids, DreamBooth's class images, evaluation); `check(model)` holds every rule a
request must follow, each mistake a one-line `InputError` before any work; `settings(model)` is what the
images say about how they were made (the PNGs' difflab JSON and, through `images.save_png`, A1111's
`parameters`). Each default is declared here once (the sampler's in samplers.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difflab.diffusion.cfg import ClassifierFreeGuidance, check_options, guidance_of
from difflab.diffusion.guidance import GuidanceTerm, check_guidance_mode
from difflab.diffusion.inputs import check_size
from difflab.diffusion.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, check_sampler_steps
from difflab.diffusion.sampling import first_step
from difflab.errors import InputError
from difflab.models.model import DiffusionModel
from difflab.models.prompt_syntax import check_blends
from difflab.models.schedules import check_choice

if TYPE_CHECKING:
    from difflab.models.text import PromptEncoder

DEFAULT_STRENGTH = 0.8  # img2img and depth-to-image, as in diffusers
DEFAULT_INPAINT_STRENGTH = 1.0  # inpainting repaints the masked region from noise
DEFAULT_NOISE_LEVEL = 20  # the ×4 upscaler's, as in diffusers
FALLBACK_MAX_NOISE_LEVEL = 350  # an upscaler whose folder does not say its highest noise level (diffusers' own)
MAX_SEED = 2 ** 64 - 1  # the largest seed torch.Generator.manual_seed takes
PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: `count` images, image i from seed + i alone (batching never changes one).

    Conditioning: `class_labels` (one per image) for class-conditional models; `prompts` (one, or one
    per image, in A1111's syntax: docs/prompts.md) and `negative_prompt` for text models, `blend` mixing
    other prompts into each (("a leopard", 0.5) or "a leopard:0.5"), or the embeddings themselves
    (`prompt_embeds` [1 or count, tokens, width], `negative_prompt_embeds`, as diffusers' pipelines take
    them). Where sampling starts: `image` (a path, PIL image or [C, H, W] tensor in [0, 1]) with
    `strength` (img2img; depth-to-image with `depth` or the model's depth estimator), `image` + `mask`
    (inpainting, white = repaint), `image` + `noise_level` (the ×4 upscaler's low-res input).
    `guidance` terms steer every image through x̂₀ (decoded, for latent models), with the gradient through
    x̂₀ only (`guidance_mode="fast"`) or through the network too ("full"). `precision` "bf16" or "fp16"
    runs fp32 networks under autocast (the samplers' arithmetic stays fp32); "auto" picks what runs fast
    on the model's device; "no" is exact fp32. A safety checker in the model's folder blacks out flagged
    images unless `safety_check=False`."""

    count: int = 1
    # the sampler
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    seed: int = 0
    eta: float | None = None  # DDIM's noise: None or 0 deterministic, 1 like DDPM
    # what each image is conditioned on
    class_labels: torch.Tensor | Sequence[int] | None = None
    prompts: str | Sequence[str] | None = None
    negative_prompt: str | Sequence[str] | None = None
    blend: Sequence[tuple[str, float] | str] = ()
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    # classifier-free guidance (its options sit together here)
    cfg_scale: float | None = None  # None: the model kind's (DiffusionModel.default_cfg_scale)
    cfg_interval: Any = None  # (low, high] noise levels σ where it guides, or "low-high"; None: the model's
    cfg_rescale: float | None = None  # 0 (none) to 1 (diffusers' guidance_rescale); None: the model's
    # the size, and where sampling starts
    width: int | None = None  # None: the input image's, else the model's
    height: int | None = None
    image: Any = None
    mask: Any = None
    depth: Any = None
    strength: float | None = None  # None: DEFAULT_STRENGTH (inpainting DEFAULT_INPAINT_STRENGTH)
    noise_level: int | None = None  # None: DEFAULT_NOISE_LEVEL
    # loss guidance
    guidance: Sequence[GuidanceTerm] = ()
    guidance_mode: str = "fast"
    # how the networks run, and whether a folder's safety checker blacks out flagged images
    precision: str = "no"
    safety_check: bool = True

    # ---- what the request means for a model ------------------------------------------------------------

    def mode(self, model: DiffusionModel) -> str:
        """txt2img, img2img, inpaint, depth or upscale (an inpainting, depth or upscaling model does only its
        own; any other model inpaints with a mask and repaints an image without one)."""
        if model.variant is not None:
            return model.variant
        if self.image is None:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"

    def run_strength(self, model: DiffusionModel) -> float | None:
        """How much of the image is repainted (1 everything), as given or the mode's default; None for a mode
        that has none (text-to-image, the upscaler)."""
        mode = self.mode(model)
        if mode in ("txt2img", "upscale"):
            return None
        if self.strength is not None:
            return self.strength
        return DEFAULT_INPAINT_STRENGTH if mode == "inpaint" else DEFAULT_STRENGTH

    def run_noise_level(self, model: DiffusionModel) -> int | None:
        """The upscaler's noise level, as given or its default; None for other models."""
        if model.variant != "upscale":
            return None
        return DEFAULT_NOISE_LEVEL if self.noise_level is None else self.noise_level

    def run_guidance(self, model: DiffusionModel) -> ClassifierFreeGuidance:
        """Classifier-free guidance as asked, the rest from the model's defaults (diffusion/cfg.py)."""
        return guidance_of(model, self.cfg_scale, self.cfg_interval, self.cfg_rescale)

    @property
    def conditioned(self) -> bool:
        return self.class_labels is not None or self.prompts is not None or self.prompt_embeds is not None

    # ---- the rules ---------------------------------------------------------------------------------------

    def check_values(self) -> None:
        """The rules that need no model (a front end makes these before loading one): whole numbers where
        they must be, a seed every image's generator takes, a strength in (0, 1], known names."""
        if isinstance(self.count, bool) or not isinstance(self.count, Integral) or self.count < 1:
            raise InputError(f"the number of images must be a whole number, at least 1 (got {self.count!r})")
        seed, count = self.seed, self.count
        if not (isinstance(seed, Integral) and 0 <= seed and seed + count - 1 <= MAX_SEED):
            last = ("" if count <= 1 else
                    f" (image i uses SEED+i, so with {count} images at most {MAX_SEED - count + 1})")
            raise InputError(f"--seed must be a whole number from 0 to {MAX_SEED}{last}; got {seed}")
        check_choice("sampler", self.sampler, SAMPLERS)
        if isinstance(self.steps, bool) or not isinstance(self.steps, Integral) or self.steps < 1:
            raise InputError(f"--steps must be at least 1 (got {self.steps!r})")
        not_negative("--eta", self.eta, "0 is deterministic, 1 like DDPM")
        not_negative("--cfg-scale", self.cfg_scale, "1 is plain conditional sampling")
        check_options(self.cfg_interval, self.cfg_rescale)
        if self.strength is not None and not (isinstance(self.strength, Real) and math.isfinite(self.strength)
                                              and 0 < self.strength <= 1):
            raise InputError(f"--strength must be in (0, 1] (got {self.strength}): it is how much of --image is "
                             "repainted, 1 everything, 0.3 a little (most of the image is kept)")
        for name, side in (("width", self.width), ("height", self.height)):
            if side is not None and (isinstance(side, bool) or not isinstance(side, Integral) or side < 1):
                raise InputError(f"--{name} must be a positive number of pixels (got {side})")
        check_guidance_mode(self.guidance_mode)
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r}; choose auto, no, bf16 or fp16")

    def check(self, model: DiffusionModel, most_steps: int | None = None) -> None:
        """Every rule, against `model`, before any work and without reading a file: what it is conditioned on,
        which inputs this model takes, a size it can make, steps its schedule has, a strength that runs a step.
        (The input images themselves are checked where they are read: planning.py.) `most_steps`: the most
        steps the caller allows (the demo's limit), so that advice stays within it."""
        self.check_values()
        check_sampler_steps(self.steps, model.noise_schedule.config.num_train_timesteps, self.sampler)
        self.check_conditioning(model)
        self.run_guidance(model)  # the model's own defaults, with what was given
        self.check_inputs(model, most_steps)

    def check_conditioning(self, model: DiffusionModel) -> None:
        count, text = self.count, model.prompts is not None
        prompts = per_image(self.prompts, count, "prompt")
        negatives = per_image(self.negative_prompt, count, "negative prompt")
        embedded = self.prompt_embeds is not None or self.negative_prompt_embeds is not None
        if embedded and not text:
            raise InputError("prompt embeddings need a text-to-image model; this model has no text encoder")
        if not text and (prompts is not None or negatives is not None):
            raise InputError("this model has no text encoder, so it takes no prompt; "
                             + ("give --class instead" if model.class_names else "it samples without conditioning"))
        if text and self.class_labels is not None:
            raise InputError("this is a text-to-image model: it takes a prompt (--prompt), not a class (--class)")
        if text and prompts is None and not embedded:
            raise InputError("this is a text-to-image model: give a prompt (--prompt \"a photo of ...\")")
        if self.class_labels is not None and len(self.class_labels) != count:
            raise InputError(f"{len(self.class_labels)} class labels for {count} images: give one per image")
        if self.blend and not text:
            raise InputError("a blend mixes prompts: it needs a text-to-image model")
        if not text:
            return
        blends = check_blends(list(self.blend or []))
        if self.prompt_embeds is not None and (prompts is not None or blends):
            raise InputError("give prompts or prompt embeddings, not both (to blend embeddings, mix them yourself: "
                             "docs/stable-diffusion.md)")
        if self.negative_prompt_embeds is not None and negatives is not None:
            raise InputError("give a negative prompt or negative prompt embeddings, not both")
        if self.prompt_embeds is None and self.negative_prompt_embeds is not None:
            raise InputError("negative prompt embeddings need prompt embeddings (prompt_embeds) beside them")
        checked_embeddings(self.prompt_embeds, count, model.prompts, "prompt_embeds")
        checked_embeddings(self.negative_prompt_embeds, count, model.prompts, "negative_prompt_embeds")

    def check_inputs(self, model: DiffusionModel, most_steps: int | None = None) -> None:
        """Which inputs this model takes, at what size, strength and noise level."""
        variant, image, mask, depth = model.variant, self.image, self.mask, self.depth
        for name, value, needs in (("mask", mask, "inpainting"), ("depth map", depth, "depth-to-image")):
            if value is not None and image is None:
                raise InputError(f"a {name} needs the image it belongs to: give --image too ({needs} repaints an "
                                 "image)")
        if image is None and variant is not None:
            raise InputError(f"this is a {model.kind.pipeline} model: it needs an input image (--image)"
                             + (" and a mask (--mask)" if variant == "inpaint" else ""))
        if variant == "inpaint" and mask is None:
            raise InputError("this is an inpainting model: give --mask (white where the image is repainted)")
        check_depth_model(model, "a depth map" if depth is not None else None)
        if mask is not None and variant in ("depth", "upscale"):
            raise InputError(f"a {model.kind.pipeline} model does not inpaint; give no --mask")
        if self.noise_level is not None and variant != "upscale":
            raise InputError("--noise-level is for the ×4 upscaler (a StableDiffusionUpscalePipeline folder)")
        if self.strength is not None and (image is None or variant == "upscale"):
            raise InputError("--strength is how much of --image is repainted (1: everything): it needs an image, "
                             "and the upscaler takes none (it uses --noise-level)")
        if variant == "upscale":
            if self.width is not None or self.height is not None:
                raise InputError("the upscaler's output size is its input's × 4: give no --width/--height")
            highest = model.max_noise_level if model.max_noise_level is not None else FALLBACK_MAX_NOISE_LEVEL
            level = self.run_noise_level(model)
            if isinstance(level, bool) or not isinstance(level, Integral):
                raise InputError(f"--noise-level must be a whole number (got {level!r})")
            if not 0 <= level <= highest:
                raise InputError(f"--noise-level {level} is outside what this upscaler takes: 0 to {highest}")
            return
        if self.width is not None or self.height is not None:
            size = model.info.image_size
            check_size(size if self.width is None else self.width, size if self.height is None else self.height,
                       model.size_factor, step=size_step(model))
        strength = self.run_strength(model)
        if strength is not None and first_step(self.steps, strength) >= self.steps:
            need = math.ceil(1 / strength)
            need += int(need * strength) < 1  # 1 / strength rounded down by floating point
            lowest = lowest_strength(self.steps)
            advice = (f"raise --strength or --steps (at least {need} steps at this strength, or a strength of at "
                      f"least {lowest:g} at {self.steps} steps)" if most_steps is None or need <= most_steps else
                      f"raise the strength to at least {lowest:g} at {self.steps} steps, or to at least "
                      f"{lowest_strength(most_steps):g} at {most_steps} steps (the most allowed here)")
            raise InputError(f"strength {strength:g} of {self.steps} steps is no step at all: {advice}")

    # ---- what the images say about how they were made ---------------------------------------------------

    def settings(self, model: DiffusionModel, image: int | None = None,
                 size: tuple[int, int] | None = None) -> dict:
        """The request as written into its images (PNG's 'difflab' JSON; `images.save_png` makes A1111's
        `parameters` from it when it holds a prompt). `image`: one image's (its seed, class and prompt);
        None: the whole request's (the first seed, the count). `size`: (width, height) of one image made,
        where the caller has it; else the asked size, if any. Input images are named when given as paths."""
        settings: dict[str, Any] = {"sampler": self.sampler, "steps": self.steps}
        settings["seed"] = self.seed if image is None else self.seed + image
        if image is None:
            settings["count"] = self.count
        if self.eta is not None:
            settings["eta"] = self.eta
        labels = None if self.class_labels is None else [int(label) for label in self.class_labels]
        names = model.class_names or []
        if labels is not None:
            chosen = labels if image is None else [labels[image]]
            if len(set(chosen)) == 1:
                settings["class"] = names[chosen[0]] if chosen[0] < len(names) else chosen[0]
        prompts = per_image(self.prompts, self.count, "prompt")
        if prompts is not None:
            chosen = prompts if image is None else [prompts[image]]
            distinct = list(dict.fromkeys(chosen))
            settings.update({"prompt": distinct[0]} if len(distinct) == 1 else {"prompts": " | ".join(distinct)})
        negatives = per_image(self.negative_prompt, self.count, "negative prompt")
        if negatives is not None and len(set(negatives)) == 1 and negatives[0]:
            settings["negative_prompt"] = negatives[0]
        if self.blend:
            settings["blend"] = [b if isinstance(b, str) else f"{b[0]}:{b[1]:g}" for b in self.blend]
        if self.conditioned:
            settings.update(self.run_guidance(model).settings(include_scale=True))
        mode = self.mode(model)
        if mode != "txt2img":  # the mode and the strength or noise level it ran at, default or not
            settings["mode"] = mode
        for name, value in (("strength", self.run_strength(model)), ("noise_level", self.run_noise_level(model))):
            if value is not None:
                settings[name] = value
        for name in ("image", "mask", "depth"):
            if isinstance(getattr(self, name), (str, Path)):
                settings[name] = str(getattr(self, name))
        width, height = size if size is not None else (self.width, self.height)
        if width is not None or height is not None:
            settings.update(width=width or model.info.image_size, height=height or model.info.image_size)
        return settings


def not_negative(flag: str, value, meaning: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise InputError(f"{flag} must be a finite number (got {value})")
    if value < 0:
        raise InputError(f"{flag} must be 0 or more (got {value}); {meaning}")


def per_image(value: str | Sequence[str] | None, count: int, what: str) -> list[str] | None:
    """One value for each image: a single value repeated, or one per image."""
    if value is None or isinstance(value, str):
        return None if value is None else [value] * count
    value = list(value)
    if len(value) == 1:
        return value * count
    if len(value) != count:
        raise InputError(f"{len(value)} {what}s for {count} images: give one, or one per image")
    return value


def lowest_strength(steps: int) -> float:
    """The lowest strength, in hundredths, that runs at least one of `steps` steps."""
    return next(k / 100 for k in range(1, 101) if first_step(steps, k / 100) < steps)


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


def check_depth_model(model: DiffusionModel, given: str | None) -> None:
    """A depth map or depth estimator (`given` names it) is for depth-to-image models only."""
    if given is not None and model.variant != "depth":
        raise InputError(f"{given} is for depth-to-image models (a StableDiffusionDepth2ImgPipeline folder); "
                         f"this is {what_model(model)}, which takes none")


def size_step(model: DiffusionModel) -> str:
    """What a model's size factor is, for messages."""
    return "the VAE's downscaling factor" if model.codec is not None else "the factor the UNet's levels halve by"


def what_model(model: DiffusionModel) -> str:
    if model.variant is not None:
        return f"a {model.kind.pipeline} model"
    return "a text-to-image model" if model.prompts is not None else "a pixel model"


# ---- where the request's images are written (the CLI checks this before any work) ---------------------

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


