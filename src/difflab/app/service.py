"""What one demo request does, without any web framework: read the page's values, check them against the
demo's limits, make them a `GenerationRequest` (which checks every other rule), generate the images with the
library's one sampling loop, and write them as PNGs that carry the request's settings.

A request has a mode: `txt2img` (from noise), `img2img` (from an image, part-way down the schedule),
`inpaint` (an image and a mask, white = repaint), `depth` (depth-to-image) and `upscale` (the ×4
upscaler). Which modes a model takes follows from what it is (`modes_of`): a pixel model or a plain
text model takes the first three, an inpainting, depth or upscaling model only its own.

`difflab.app.demo` puts a Gradio page in front of this; tests call it directly.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difflab.app.guides import Guides, hex_color
from difflab.diffusion.cfg import guidance_of, interval_text
from difflab.diffusion.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from difflab.errors import ConfigError, ModelError
from difflab.models.schedules import check_choice

if TYPE_CHECKING:
    from difflab.models.model import DiffusionModel

MAX_SEED = 2**32 - 1
MAX_CFG_SCALE = 20.0
KEEP_REQUESTS = 100  # request folders kept on disk; older ones are deleted (the page has copied them by then)
MAX_TEXT_CHARS = 2000  # a prompt or negative prompt (the tokenizer keeps its first 77 tokens, with a warning)
MAX_LORA_SCALE = 2.0  # a LoRA's weight in a request: 0 is the base model, 1 the LoRA as trained
MODES = {  # mode -> what the page calls it
    "txt2img": "text to image",
    "img2img": "image to image",
    "inpaint": "inpainting",
    "depth": "depth to image",
    "upscale": "upscaling",
}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server. Requests beyond them are refused with a message."""

    max_steps: int = 100
    max_images: int = 8  # per request
    max_image_size: int = 512  # pixels a side of any image made; models whose own size is larger are refused
    max_queue: int = 64  # requests waiting; more are turned away until the queue drains

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"the demo limit {name.replace('_', '-')} must be a whole number, at least 1")


@dataclass
class Request:
    """The settings of one request, as the page sends them."""

    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    seed: int = 0
    count: int = 4
    class_name: str | None = None  # class-conditional models only
    cfg_scale: float | None = None  # None: the model's default (DEFAULT_CFG_SCALE; 7.5 for text models)
    cfg_interval: str | None = None  # "LOW-HIGH": the noise levels where CFG acts; None or "": the model's
    cfg_rescale: float | None = None  # guidance rescale in [0, 1]; None: the model's
    color: str | None = None  # "#rrggbb"; colour guidance when color_scale > 0
    color_scale: float = 0.0
    prompt: str = ""  # text models: what to draw (and CLIP guidance's prompt); pixel models: CLIP guidance's
    clip_scale: float = 0.0
    # text models
    negative_prompt: str = ""
    width: int | None = None  # None: the input image's size (fitted to the limits), else the model's
    height: int | None = None
    # where sampling starts (see MODES); image, mask and depth are paths, PIL images or arrays in [0, 1]
    mode: str = "txt2img"
    image: Any = None
    mask: Any = None  # white = repaint
    depth: Any = None  # depth-to-image: a depth map (else the model's depth estimator)
    strength: float | None = None  # None: the request's default (diffusion/request.py)
    noise_level: int | None = None  # the upscaler's; None: the request's default
    # text models: one of the LoRAs the demo was started with (by its label; "" or None: no LoRA), and its weight
    lora: str | None = None
    lora_scale: float | None = None  # None: 1


def whole_number(name: str, value, low: int, high: int) -> int:
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(r"[+-]?\d+(\.0*)?", value):
            raise ConfigError(f"{name} must be a whole number from {low} to {high} (got {value!r})")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise ConfigError(f"{name} must be a whole number from {low} to {high} (got {value!r})")
    if not low <= int(value) <= high:
        raise ConfigError(f"{name} must be from {low} to {high} (got {int(value)})")
    return int(value)


def number(name: str, value, low: float, high: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number from {low:g} to {high:g} (got {value!r})") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{name} must be a number from {low:g} to {high:g} (got {value!r})")
    return value


def parsed(name: str, value):
    """A number the page sent (a number or its text); the request checks its range."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number (got {value!r})") from None


def modes_of(model: DiffusionModel) -> tuple[str, ...]:
    """The modes a model takes: its variant's own, or txt2img, img2img and inpainting."""
    if model.variant is not None:
        return (model.variant,)
    return ("txt2img", "img2img", "inpaint")


def check_model(model: DiffusionModel, limits: Limits, spec) -> None:
    """Refuse, when the demo starts, a model whose images are larger than the limit."""
    size = model.info.image_size
    if size > limits.max_image_size:
        raise ModelError(f"{spec} makes {size}x{size} images, larger than this demo's limit of "
                         f"{limits.max_image_size}; raise --max-image-size if the server can take it")
    if model.size_factor > limits.max_image_size:
        raise ModelError(f"{spec} makes images in steps of {model.size_factor} pixels, more than this demo's limit "
                         f"of {limits.max_image_size}; raise --max-image-size")


def largest_side(model: DiffusionModel, limits: Limits) -> int:
    """The largest width or height a request may ask for: the limit, rounded down to the model's factor."""
    return limits.max_image_size // model.size_factor * model.size_factor


def fit_size(width: int, height: int, factor: int, largest: int) -> tuple[int, int]:
    """An input image's size, scaled down (aspect kept) to fit `largest` a side and rounded down to the factor."""
    scale = min(1.0, largest / max(width, height))
    return tuple(max(factor, int(side * scale) // factor * factor) for side in (width, height))


def text(name: str, value, limit: int = MAX_TEXT_CHARS) -> str:
    value = "" if value is None else str(value).strip()
    if len(value) > limit:
        raise ConfigError(f"the {name} is {len(value)} characters long; keep it under {limit}")
    return value


def check_request(request: Request, model: DiffusionModel, limits: Limits, guides, loras=None) -> Request:
    """`request` with its values checked and made the right types; a ConfigError says what is wrong.
    `loras` (a `LoraMenu`) are the LoRAs a request may choose from."""
    cfg_scale = model.default_cfg_scale if request.cfg_scale in (None, "") else request.cfg_scale
    checked = Request(
        sampler=check_choice("sampler", str(request.sampler), SAMPLERS),
        steps=whole_number("steps", request.steps, 1, limits.max_steps),
        seed=whole_number("seed", request.seed, 0, MAX_SEED),
        count=whole_number("number of images", request.count, 1, limits.max_images),
        cfg_scale=number("CFG scale", cfg_scale, 0.0, MAX_CFG_SCALE),
        color_scale=number("colour guidance scale", request.color_scale or 0.0, 0.0, guides.max_color_scale),
        clip_scale=number("CLIP guidance scale", request.clip_scale or 0.0, 0.0, guides.max_clip_scale or math.inf),
        prompt=text("prompt", request.prompt),
        negative_prompt=text("negative prompt", request.negative_prompt),
    )
    if model.prompts is not None and not checked.prompt:
        raise ConfigError("write a prompt: this is a text-to-image model, it draws what the prompt describes")
    if model.prompts is None and checked.negative_prompt:
        raise ConfigError("this model has no text encoder: it takes no negative prompt")
    check_inputs(request, checked, model, limits)
    check_lora(request, checked, loras)
    rescale = None if request.cfg_rescale in (None, "") else number("guidance rescale", request.cfg_rescale, 0, 1)
    cfg = guidance_of(model, checked.cfg_scale, request.cfg_interval or None, rescale)  # diffusion/cfg.py
    checked.cfg_interval, checked.cfg_rescale = interval_text(cfg.interval), cfg.rescale
    if model.class_names:
        if request.class_name in (None, ""):
            raise ConfigError(f"choose a class: one of {', '.join(model.class_names[:12])}")
        if "," in str(request.class_name):
            raise ConfigError("choose one class per request")
        checked.class_name = model.class_names[model.class_indices(str(request.class_name).strip())[0]]
    elif request.class_name not in (None, ""):
        raise ConfigError("this model is unconditional: it has no classes to choose from")
    if checked.color_scale > 0:
        checked.color = hex_color(request.color)
    if checked.clip_scale > 0:
        if guides.clip is None:
            raise ConfigError("CLIP guidance needs a CLIP model: start the demo with --clip-model")
        guides.check_prompt(checked.prompt)
    generation = generation_request(checked, model)
    generation.check(model, most_steps=limits.max_steps)  # every rule a request follows
    checked.strength, checked.noise_level = generation.run_strength(model), generation.run_noise_level(model)
    return checked


def check_lora(request: Request, checked: Request, loras) -> None:
    """The LoRA a request chose, by its label in the page's list, and its weight."""
    label = "" if request.lora is None else str(request.lora).strip()
    if not label:
        return  # the page sends its weight slider's value with "no LoRA" too: nothing to check
    offered = loras.labels if loras is not None else []
    if label not in offered:
        raise ConfigError(f"no LoRA named {label!r} here: " + (f"choose one of {', '.join(offered[:12])}" if offered
                          else "this demo was started without LoRAs (difflab demo --model BASE --lora RUN)"))
    checked.lora = label
    scale = 1.0 if request.lora_scale in (None, "") else request.lora_scale
    checked.lora_scale = number("LoRA weight", scale, 0.0, MAX_LORA_SCALE)


def check_inputs(request: Request, checked: Request, model: DiffusionModel, limits: Limits) -> None:
    """The page's mode, its images and the output size, into `checked` (input images read, as PIL), within
    the demo's limits; the rules every request follows are the `GenerationRequest`'s (`check_request`)."""
    from difflab.diffusion.inputs import read_image

    mode = str(request.mode or "txt2img")
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    modes = modes_of(model)
    if mode not in modes:
        what = f"a {model.kind.pipeline} model" if model.variant is not None else "this model"
        raise ConfigError(f"{what} does {', '.join(MODES[m] for m in modes)}, not {MODES[mode]}")
    checked.mode = mode
    if mode != "txt2img":
        if request.image is None:
            raise ConfigError(f"{MODES[mode]} starts from an image: upload one")
        checked.image = read_image(request.image, "image").convert("RGB" if model.info.channels == 3 else "L")
    if mode == "inpaint":
        if request.mask is None:
            raise ConfigError("inpainting needs a mask: paint over the region to repaint, or upload a mask "
                              "(white = repaint)")
        checked.mask = read_image(request.mask, "mask").convert("L")
        if checked.mask.getextrema()[1] < 128:
            raise ConfigError("the mask is empty: paint over the region to repaint (or upload a mask, white = "
                              "repaint)")
    if mode == "depth" and request.depth is not None:
        checked.depth = read_image(request.depth, "depth map")
    if mode in ("img2img", "depth", "inpaint") and request.strength not in (None, ""):
        checked.strength = parsed("strength", request.strength)
    largest = largest_side(model, limits)
    if mode == "upscale":
        if request.noise_level not in (None, ""):
            checked.noise_level = whole_number("noise level", request.noise_level, 0, 1 << 16)
        checked.width, checked.height = request.width or None, request.height or None  # the request refuses them
        factor = model.codec.factor
        width, height = (max(factor, side // factor * factor) for side in checked.image.size)
        if max(width, height) * 4 > largest:
            raise ConfigError(f"the upscaler makes images 4× its input: {width}×{height} would give "
                              f"{width * 4}×{height * 4}, over this demo's limit of {largest} pixels a side; "
                              f"upload an image at most {largest // 4} pixels a side")
        return
    if request.width in (None, "") and request.height in (None, ""):
        if checked.image is not None:
            checked.width, checked.height = fit_size(*checked.image.size, model.size_factor, largest)
        elif model.prompts is None:
            return  # a pixel model from noise: its own size
        else:
            checked.width = checked.height = model.info.image_size
    else:
        size = model.info.image_size
        checked.width = whole_number("width", size if request.width in (None, "") else request.width, 1, 1 << 16)
        checked.height = whole_number("height", size if request.height in (None, "") else request.height, 1, 1 << 16)
    if max(checked.width, checked.height) > largest:
        raise ConfigError(f"the image size {checked.width}×{checked.height} is over this demo's limit of "
                          f"{largest} pixels a side")


def generation_request(request: Request, model: DiffusionModel, guidance=()):
    """The `GenerationRequest` a checked page request asks for."""
    from difflab.diffusion.request import GenerationRequest

    labels = None
    if request.class_name is not None:
        labels = [model.class_names.index(request.class_name)] * request.count
    text = {}
    if model.prompts is not None:
        text = dict(prompts=request.prompt, negative_prompt=request.negative_prompt or None)
    inputs = {}
    if request.mode != "txt2img":
        inputs = dict(image=request.image, mask=request.mask, depth=request.depth, strength=request.strength,
                      noise_level=request.noise_level)
    return GenerationRequest(request.count, sampler=request.sampler, steps=request.steps, seed=request.seed,
                             class_labels=labels, cfg_scale=request.cfg_scale, cfg_interval=request.cfg_interval,
                             cfg_rescale=request.cfg_rescale, width=request.width,
                             height=request.height, guidance=tuple(guidance), **text, **inputs)


def settings_of(request: Request, model_name: str, model: DiffusionModel, image: int, loras=None) -> dict:
    """The settings that made image `image` of a request, as saved in its PNG: the `GenerationRequest`'s own
    (a text model's carry the prompt, so `save_png` writes AUTOMATIC1111's `parameters` text too), with the
    model's name, the guidance the page chose and its LoRA."""
    settings = {"model": model_name, **generation_request(request, model).settings(model, image=image)}
    if request.color_scale > 0:
        settings.update({"color": request.color, "color_scale": request.color_scale})
    if request.clip_scale > 0:
        settings.update({"prompt": request.prompt, "clip_scale": request.clip_scale})
    if request.lora:  # as `difflab sample --lora` records them
        settings.update({"lora": [loras.spec(request.lora)], "lora_scale": [request.lora_scale]})
    return settings


def caption(settings: dict, lora: str | None = None) -> str:
    """One line under an image: what made it (`lora`: the LoRA's label in the page)."""
    parts = [f"seed {settings['seed']}"]
    if "class" in settings:
        parts.append(f"class {settings['class']} (CFG {settings['cfg_scale']:g})")
    elif "cfg_scale" in settings:
        parts.append(f"CFG {settings['cfg_scale']:g}")
    if "cfg_interval" in settings or "cfg_rescale" in settings:  # said beside the scale, as the PNG records them
        named = (("cfg_interval", "at σ"), ("cfg_rescale", "rescale"))
        parts[-1] += "".join(f", {name} {settings[key]}" for key, name in named if key in settings)
    parts.append(f"{settings['sampler']}, {settings['steps']} steps")
    if "width" in settings:
        parts.append(f"{settings['width']}×{settings['height']}")
    if "mode" in settings:
        mode = MODES[settings["mode"]]
        if "strength" in settings:
            mode += f", strength {settings['strength']:g}"
        if "noise_level" in settings:
            mode += f", noise level {settings['noise_level']}"
        parts.append(mode)
    if "color" in settings:
        parts.append(f"colour {settings['color']} ×{settings['color_scale']:g}")
    if "clip_scale" in settings:
        parts.append(f"CLIP {settings['prompt']!r} ×{settings['clip_scale']:g}")
    if lora:
        parts.append(f"LoRA {lora} ×{settings['lora_scale'][0]:g}")
    return " · ".join(parts)


class Generator:
    """Serves requests for one loaded model: check, generate, write PNGs under `out_root`."""

    def __init__(self, model: DiffusionModel, model_name: str, limits: Limits, guides=None,
                 out_root: Path | None = None, loras=None):
        self.model, self.model_name, self.limits, self.guides = model, model_name, limits, guides or Guides()
        self.out_root = Path(out_root or tempfile.mkdtemp(prefix="difflab-demo-"))
        self.loras = loras  # a LoraMenu, already loaded onto the model
        self.lock = threading.Lock()  # the model's LoRA is chosen per request: one request samples at a time

    def __call__(self, request: Request, progress: bool = False) -> list[tuple[Path, str]]:
        """(PNG path, caption) for each image of `request`; a DifflabError if the request is refused."""
        from difflab.diffusion.generate import generate
        from difflab.images import save_png, to_pil

        request = check_request(request, self.model, self.limits, self.guides, self.loras)
        generation = generation_request(request, self.model, self.guides.terms(request))
        with self.lock:
            if self.loras:
                self.loras.use(self.model, request.lora, request.lora_scale)
            images = generate(self.model, generation, batch_size=self.limits.max_images, progress=progress)
        folder = self.new_folder()
        results = []
        for i, image in enumerate(images):
            each = settings_of(request, self.model_name, self.model, i, self.loras)
            path = save_png(to_pil(image), folder / f"seed{request.seed + i:010d}.png", each)
            results.append((path, caption(each, request.lora)))
        return results

    def new_folder(self) -> Path:
        self.out_root.mkdir(parents=True, exist_ok=True)
        folders = sorted(self.out_root.glob("request-*"), key=lambda p: p.stat().st_mtime)
        for old in folders[:max(0, len(folders) - KEEP_REQUESTS + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix="request-", dir=self.out_root))
