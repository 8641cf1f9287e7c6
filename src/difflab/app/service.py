"""What one demo request does, without any web framework: check it against the limits, generate the
images with the library's one sampling loop, and write them as PNGs that carry their settings.

`difflab.app.demo` puts a Gradio page in front of this; tests call it directly.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from difflab.app.guides import Guides, hex_color
from difflab.diffusion.samplers import DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from difflab.diffusion.schedules import check_choice
from difflab.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from difflab.models.model import DiffusionModel

MAX_SEED = 2**32 - 1
MAX_CFG_SCALE = 20.0
KEEP_REQUESTS = 100  # request folders kept on disk; older ones are deleted (the page has copied them by then)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server. Requests beyond them are refused with a message."""

    max_steps: int = 100
    max_images: int = 8  # per request
    max_image_size: int = 256  # pixels a side: larger models are refused when the demo starts
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
    cfg_scale: float = DEFAULT_CFG_SCALE
    color: str | None = None  # "#rrggbb"; colour guidance when color_scale > 0
    color_scale: float = 0.0
    prompt: str = ""  # CLIP guidance when a CLIP model is loaded and clip_scale > 0
    clip_scale: float = 0.0


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


def check_model(model: DiffusionModel, limits: Limits, spec) -> None:
    """Refuse, when the demo starts, a model whose images are larger than the limit."""
    size = model.info.image_size
    if size > limits.max_image_size:
        raise ModelError(f"{spec} makes {size}x{size} images, larger than this demo's limit of "
                         f"{limits.max_image_size}; raise --max-image-size if the server can take it")


def check_request(request: Request, model: DiffusionModel, limits: Limits, guides) -> Request:
    """`request` with its values checked and made the right types; a ConfigError says what is wrong."""
    checked = Request(
        sampler=check_choice("sampler", str(request.sampler), SAMPLERS),
        steps=whole_number("steps", request.steps, 1, limits.max_steps),
        seed=whole_number("seed", request.seed, 0, MAX_SEED),
        count=whole_number("number of images", request.count, 1, limits.max_images),
        cfg_scale=number("CFG scale", request.cfg_scale, 0.0, MAX_CFG_SCALE),
        color_scale=number("colour guidance scale", request.color_scale or 0.0, 0.0, guides.max_color_scale),
        clip_scale=number("CLIP guidance scale", request.clip_scale or 0.0, 0.0, guides.max_clip_scale or math.inf),
        prompt=str(request.prompt or "").strip(),
    )
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
    return checked


def settings_of(request: Request, model_name: str, model: DiffusionModel) -> dict:
    """The settings that made one request's images, as saved in each PNG (plus each image's seed)."""
    settings = {"model": model_name, "sampler": request.sampler, "steps": request.steps}
    if model.class_names:
        settings.update({"class": request.class_name, "cfg_scale": request.cfg_scale})
    if request.color_scale > 0:
        settings.update({"color": request.color, "color_scale": request.color_scale})
    if request.clip_scale > 0:
        settings.update({"prompt": request.prompt, "clip_scale": request.clip_scale})
    return settings


def caption(settings: dict) -> str:
    """One line under an image: what made it."""
    parts = [f"seed {settings['seed']}"]
    if "class" in settings:
        parts.append(f"class {settings['class']} (CFG {settings['cfg_scale']:g})")
    parts.append(f"{settings['sampler']}, {settings['steps']} steps")
    if "color" in settings:
        parts.append(f"colour {settings['color']} ×{settings['color_scale']:g}")
    if "prompt" in settings:
        parts.append(f"CLIP {settings['prompt']!r} ×{settings['clip_scale']:g}")
    return " · ".join(parts)


class Generator:
    """Serves requests for one loaded model: check, generate, write PNGs under `out_root`."""

    def __init__(self, model: DiffusionModel, model_name: str, limits: Limits, guides=None,
                 out_root: Path | None = None):
        self.model, self.model_name, self.limits, self.guides = model, model_name, limits, guides or Guides()
        self.out_root = Path(out_root or tempfile.mkdtemp(prefix="difflab-demo-"))

    def __call__(self, request: Request, progress: bool = False) -> list[tuple[Path, str]]:
        """(PNG path, caption) for each image of `request`; a DifflabError if the request is refused."""
        import torch

        from difflab.diffusion.generate import generate
        from difflab.images import save_png, to_pil

        request = check_request(request, self.model, self.limits, self.guides)
        labels = None
        if request.class_name is not None:
            index = self.model.class_names.index(request.class_name)
            labels = torch.full((request.count,), index, dtype=torch.long)
        extra = {}
        terms = self.guides.terms(request)
        if terms:
            extra["guidance"] = terms
        images = generate(self.model, request.count, sampler=request.sampler, steps=request.steps,
                          seed=request.seed, class_labels=labels, cfg_scale=request.cfg_scale,
                          batch_size=self.limits.max_images, progress=progress, **extra)
        folder = self.new_folder()
        settings = settings_of(request, self.model_name, self.model)
        results = []
        for i, image in enumerate(images):
            each = {**settings, "seed": request.seed + i}
            path = save_png(to_pil(image), folder / f"seed{request.seed + i:010d}.png", each)
            results.append((path, caption(each)))
        return results

    def new_folder(self) -> Path:
        self.out_root.mkdir(parents=True, exist_ok=True)
        folders = sorted(self.out_root.glob("request-*"), key=lambda p: p.stat().st_mtime)
        for old in folders[:max(0, len(folders) - KEEP_REQUESTS + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix="request-", dir=self.out_root))
