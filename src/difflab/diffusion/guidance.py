"""Guidance: wrappers around the model function that change what it predicts.

A wrapper takes a model function `(x_t, t) -> prediction` and returns another, so guidance methods
compose with each other and with every sampler without the sampling loop knowing about them.

Two kinds live here:

- classifier-free guidance mixes the conditional and unconditional predictions;
- loss guidance (course unit 2) scores the clean-image estimate x̂₀ with differentiable losses
  (`GuidanceTerm`s: a colour, a CLIP prompt or image, a classifier's class, any callable) and moves
  x̂₀ down their gradient:

      x̂₀' = x̂₀ − (H·W / 256) · ∇ Σ_terms scale · Σ_images loss(x̂₀)

  "fast" mode takes the gradient with respect to x̂₀ itself (the network runs without grad);
  "full" mode takes it with respect to x_t, through the network, times √ᾱ_t (so that where the
  network's own dependence on x_t is negligible the two agree). The new prediction is the one that
  implies x̂₀' at the same x_t, which is right for ε, v and x₀ prediction and for every sampler,
  since every sampler's step is a function of (x_t, x̂₀). The H·W/256 factor makes a loss that is
  a mean over pixels move each pixel by the same amount at every image size (at 16×16 it is plain
  gradient descent on x̂₀ with step `scale`).

For latent models the losses score the decoded image, decode(x̂₀), and the gradient reaches the latent
x̂₀ through the VAE decoder (and, in full mode, through the UNet too); H·W is then the latent's size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.diffusion.cfg import ClassifierFreeGuidance
from difflab.diffusion.predictions import alpha_bar, from_x0, to_x0
from difflab.diffusion.samplers import GUIDANCE_MODES
from difflab.diffusion.sampling import ModelFn
from difflab.errors import GuidanceError
from difflab.models.clip import ClipScorer, load_clip
from difflab.models.conditioning import Conditioning

__all__ = [
    "GuidanceTerm", "ClipScorer", "load_clip", "classifier_free_guidance", "loss_guidance", "color_guidance",
    "clip_guidance", "image_guidance", "classifier_guidance", "custom_guidance", "parse_color", "parse_guide",
]

DEFAULT_COLOR_SCALE = 80.0  # halves the distance to the colour of a CIFAR-10 model at 16×16 (docs/benchmarks.md)
DEFAULT_CLIP_SCALE = 8.0
DEFAULT_IMAGE_SCALE = 8.0
DEFAULT_CLASSIFIER_SCALE = 2.0
DEFAULT_CUTS = 4
REFERENCE_PIXELS = 16 * 16  # the image size at which `scale` is the plain gradient step on x̂₀


def classifier_free_guidance(denoiser, conditioning: Conditioning, unconditional: Conditioning,
                             scale: float) -> ModelFn:
    """pred = pred(x, ∅) + scale · (pred(x, c) − pred(x, ∅)), both from one batched forward pass (the
    unconditional half first, as diffusers batches it). ∅ is the conditioning's "empty" twin: the
    null class, the negative prompt. Scale 1 is plain conditional sampling (one pass), 0
    unconditional, above 1 closer to the condition. Mixing predictions linearly is the same for ε, v
    and x₀ targets, since each is affine in ε. The interval and rescale: diffusion/cfg.py."""
    return ClassifierFreeGuidance(scale).wrap(denoiser, conditioning, unconditional)


# --- guidance terms ---------------------------------------------------------------------------------

@dataclass
class GuidanceTerm:
    """A differentiable loss on x̂₀ (images in [-1, 1], [B, C, H, W]) -> per-image losses [B] (or a
    scalar), weighted by `scale`, acting on the steps whose fraction of the run lies in `window`,
    every `every` steps."""

    name: str  # "color", "clip", "image", "classifier", "custom"
    loss: Callable[[torch.Tensor], torch.Tensor]
    scale: float
    window: tuple[float, float] = (0.0, 1.0)
    every: int = 1

    def __post_init__(self):
        start, end = self.window
        if not math.isfinite(self.scale):
            raise GuidanceError(f"the {self.name} guidance scale must be a finite number, not {self.scale}")
        if not 0.0 <= start < end <= 1.0:
            raise GuidanceError(f"the {self.name} guidance window {start}-{end} must be two fractions of the steps "
                                "with 0 <= start < end <= 1")
        if self.every < 1:
            raise GuidanceError(f"the {self.name} guidance cadence must be at least 1 (every step), not {self.every}")

    def acts_at(self, step: int, steps: int) -> bool:
        """Whether the term acts at `step` (0-based) of `steps`."""
        return self.window[0] * steps <= step < self.window[1] * steps and step % self.every == 0


def color_loss(rgb: tuple[float, float, float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per image: the mean absolute distance of its pixels to `rgb` (in [0, 1]), in [-1, 1] units.
    Grey images are compared with the colour's luma."""
    r, g, b = (2 * c - 1 for c in rgb)

    def loss(x0: torch.Tensor) -> torch.Tensor:
        target = [r, g, b] if x0.shape[1] == 3 else [0.299 * r + 0.587 * g + 0.114 * b] * x0.shape[1]
        target = torch.tensor(target, device=x0.device, dtype=x0.dtype).view(1, -1, 1, 1)
        return (x0 - target).abs().mean(dim=(1, 2, 3))

    return loss


def color_guidance(rgb: tuple[float, float, float], scale: float = DEFAULT_COLOR_SCALE, *,
                   window: tuple[float, float] = (0.0, 1.0), every: int = 1) -> GuidanceTerm:
    """Pull the images towards the colour `rgb` (each channel in [0, 1]): the course's colour loss."""
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise GuidanceError(f"a guidance colour is three numbers in [0, 1], not {tuple(rgb)}")
    return GuidanceTerm("color", color_loss(tuple(rgb)), scale, window, every)


def cutouts(images: torch.Tensor, count: int, size: int) -> torch.Tensor:
    """`count` random square crops of every image (side 50-100% of the image's, the same boxes for
    every image in the batch), half of them flipped, each resized to `size`: [count·B, C, size, size].
    Uses torch's global generator; `loss_guidance` seeds it per step inside `fork_rng`."""
    h, w = images.shape[-2:]
    out = []
    for _ in range(count):
        side = max(1, int(min(h, w) * (0.5 + 0.5 * torch.rand(()).item())))
        top = int(torch.randint(0, h - side + 1, ()).item())
        left = int(torch.randint(0, w - side + 1, ()).item())
        crop = images[..., top:top + side, left:left + side]
        if torch.rand(()).item() < 0.5:
            crop = crop.flip(-1)
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(out)


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The squared great-circle distance between normalised embeddings (the course's CLIP loss)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return (a - b).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)


def clip_loss(clip: ClipScorer, target: torch.Tensor, cuts: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per image: the mean over `cuts` cut-outs of the distance of their CLIP embedding to `target` [D]."""
    if cuts < 1:
        raise GuidanceError(f"CLIP guidance needs at least one cut-out, not {cuts}")

    def loss(x0: torch.Tensor) -> torch.Tensor:
        pieces = cutouts(x0, cuts, clip.size)
        distances = spherical_distance(clip.embed_images(pieces), target.to(pieces.device)[None])
        return distances.view(cuts, x0.shape[0]).mean(0).to(x0.device)

    return loss


def clip_guidance(prompt: str, clip: ClipScorer | None, scale: float = DEFAULT_CLIP_SCALE,
                  cuts: int = DEFAULT_CUTS, *, window: tuple[float, float] = (0.0, 1.0),
                  every: int = 1) -> GuidanceTerm:
    """Pull the images towards a text prompt, as a CLIP model sees them (several augmented cut-outs)."""
    if clip is None:
        raise GuidanceError("clip guidance needs a CLIP model: give --clip-model PATH_OR_ID "
                            "(for example openai/clip-vit-base-patch32 while online)")
    if not prompt.strip():
        raise GuidanceError("clip guidance needs a prompt, as in clip=\"a red rose\":8")
    return GuidanceTerm("clip", clip_loss(clip, clip.embed_text([prompt])[0], cuts), scale, window, every)


def read_image_tensor(path: str | Path) -> torch.Tensor:
    """An image file -> [3, H, W] in [0, 1], through the decoder training data goes through (its format
    allow-list, pixel limit and colour handling)."""
    from difflab.data.decode import UnreadableImage, read_whole_image

    try:
        pixels = read_whole_image(path, channels=3)
    except UnreadableImage as e:
        raise GuidanceError(f"cannot read the guidance image {str(path)!r} ({e}); "
                            "give a PNG, JPEG, WebP, BMP or GIF file") from None
    return torch.from_numpy(pixels).float() / 255


def image_guidance(image: str | Path | torch.Tensor, clip: ClipScorer | None, scale: float = DEFAULT_IMAGE_SCALE,
                   cuts: int = DEFAULT_CUTS, *, window: tuple[float, float] = (0.0, 1.0),
                   every: int = 1) -> GuidanceTerm:
    """Pull the images towards a reference image (a file, or [C, H, W] in [0, 1]) in CLIP's embedding."""
    if clip is None:
        raise GuidanceError("image guidance needs a CLIP model: give --clip-model PATH_OR_ID "
                            "(for example openai/clip-vit-base-patch32 while online)")
    pixels = read_image_tensor(image) if isinstance(image, (str, Path)) else image
    with torch.no_grad():
        target = clip.embed_images(pixels[None].to(clip.device) * 2 - 1)[0]
    return GuidanceTerm("image", clip_loss(clip, target, cuts), scale, window, every)


def classifier_guidance(classifier: torch.nn.Module, class_index: int, scale: float = DEFAULT_CLASSIFIER_SCALE, *,
                        window: tuple[float, float] = (0.0, 1.0), every: int = 1) -> GuidanceTerm:
    """Raise the log-probability of class `class_index` under `classifier` (images in [-1, 1] ->
    logits; for example the network `difflab eval` trains, `TrainedClassifier.network`)."""
    classifier.eval().requires_grad_(False)

    def loss(x0: torch.Tensor) -> torch.Tensor:
        return -F.log_softmax(classifier(x0), dim=1)[:, class_index]

    return GuidanceTerm("classifier", loss, scale, window, every)


def custom_guidance(loss: Callable[[torch.Tensor], torch.Tensor], scale: float, *,
                    window: tuple[float, float] = (0.0, 1.0), every: int = 1) -> GuidanceTerm:
    """Any differentiable `loss(x0) -> per-image losses [B] or a scalar`, x0 in [-1, 1]."""
    return GuidanceTerm("custom", loss, scale, window, every)


# --- the wrapper ----------------------------------------------------------------------------------

def step_order(timesteps: Sequence) -> torch.Tensor:
    """The distinct timesteps in the order the sampler visits them (Heun and PNDM visit some twice)."""
    return torch.tensor(list(dict.fromkeys(float(t) for t in timesteps)))


def check_guidance_mode(mode: str) -> None:
    if mode not in GUIDANCE_MODES:
        raise GuidanceError(f"unknown guidance mode {mode!r}; choose fast (gradient through x̂₀ only) "
                            "or full (through the network too)")


def loss_guidance(model_fn: ModelFn, terms: Sequence[GuidanceTerm], noise_schedule, timesteps: Sequence,
                  mode: str = "fast", decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ModelFn:
    """Wrap `model_fn` so that its prediction implies x̂₀ moved down the gradient of the active
    `terms`' losses (see the module's docstring). `timesteps` are those the run visits (a run that
    starts part-way down the schedule, like img2img, visits only the last ones): a call's position
    among them says which terms act. `noise_schedule` is the model's. For latent models `decode`
    maps x̂₀ to the image the losses score, and the gradient flows back through it."""
    check_guidance_mode(mode)
    terms = list(terms)
    if not terms:
        return model_fn
    alphas_cumprod = noise_schedule.alphas_cumprod
    kind = noise_schedule.config.prediction_type
    order = step_order(timesteps)

    def total_loss(active: list[GuidanceTerm], x0: torch.Tensor, step: int) -> torch.Tensor:
        images = decode(x0) if decode is not None else x0
        # Random augmentations (CLIP cut-outs) are seeded by the step: same seed, same image.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step)
            return sum(term.scale * term.loss(images).sum() for term in active)

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = int((order - float(t)).abs().argmin())
        active = [term for term in terms if term.acts_at(step, len(order))]
        if not active:
            return model_fn(x_t, t)
        abar = alpha_bar(alphas_cumprod, torch.as_tensor(t).cpu()).to(x_t.device, x_t.dtype)
        with torch.enable_grad():
            if mode == "full":
                x = x_t.detach().requires_grad_()
                prediction = model_fn(x, t)
                x0 = to_x0(prediction, x, abar, kind)
                grad = torch.autograd.grad(total_loss(active, x0, step), x)[0] * abar.sqrt()
                x0 = x0.detach()
            else:
                with torch.no_grad():
                    prediction = model_fn(x_t, t)
                x0 = to_x0(prediction, x_t, abar, kind).detach().requires_grad_()
                grad = torch.autograd.grad(total_loss(active, x0, step), x0)[0]
        x0 = x0 - grad * (x_t.shape[-2] * x_t.shape[-1] / REFERENCE_PIXELS)
        return from_x0(x0, x_t, abar, kind)

    return guided


# --- parsing what people type ---------------------------------------------------------------------

COLOR_NAMES = {
    "red": "#ff0000", "green": "#00ff00", "blue": "#0000ff", "yellow": "#ffff00", "cyan": "#00ffff",
    "magenta": "#ff00ff", "white": "#ffffff", "black": "#000000", "grey": "#808080", "gray": "#808080",
    "orange": "#ff8000", "purple": "#800080", "pink": "#ffc0cb",
}


RGB_FUNCTION = re.compile(r"rgba?\(\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*(?:,\s*[\d.]+\s*)?\)")


def parse_color(text: str) -> tuple[float, float, float]:
    """'#55FFAA', '55ffaa', '#5fa', 'rgb(85, 255, 170)' / 'rgba(…, alpha)' (what colour pickers send)
    or a basic colour name ('red') -> (r, g, b) in [0, 1]."""
    value = COLOR_NAMES.get(text.strip().lower(), text.strip())
    function = RGB_FUNCTION.fullmatch(value.lower())
    if function:
        channels = [round(float(c)) for c in function.groups()]
        if not all(0 <= c <= 255 for c in channels):
            raise GuidanceError(f"colour {text!r} is not a colour: each of r, g, b runs from 0 to 255; "
                                "or give it as #rrggbb, e.g. #55ffaa")
        return tuple(c / 255 for c in channels)
    digits = value[1:] if value.startswith("#") else value
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    if len(digits) != 6 or not all(c in "0123456789abcdefABCDEF" for c in digits):
        raise GuidanceError(f"cannot read the colour {text!r}; give a hex colour like #55FFAA or a name "
                            f"({', '.join(COLOR_NAMES)})")
    return tuple(int(digits[i:i + 2], 16) / 255 for i in (0, 2, 4))


# A scale is a number; inf and nan are read as numbers too, so that GuidanceTerm blames the scale for them.
SPEC = re.compile(r"^(?P<name>[A-Za-z_]+)=(?P<value>.*?)"
                  r"(?::(?P<scale>[-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|[iI][nN][fF]|[nN][aA][nN])))?"
                  r"(?:@(?P<start>[0-9.]+)-(?P<end>[0-9.]+))?(?:/(?P<every>[0-9]+))?$", re.DOTALL)
TERMS = ("color", "clip", "image", "classifier")


def parse_guide(spec: str, *, clip: ClipScorer | None = None, classifier=None,
                cuts: int = DEFAULT_CUTS) -> GuidanceTerm:
    """A guidance term from 'NAME=VALUE[:SCALE][@START-END][/EVERY]':
    color=#55FFAA:40, clip=a red rose:8, image=ref.png:8, classifier=7:2 (a class index or name),
    with an optional window (color=red:40@0-0.5: the first half of the steps) and cadence (/2: every
    second step). `clip` is a ClipScorer for clip and image terms; `classifier` a `TrainedClassifier`
    (or a callable returning one, called only when needed) for classifier terms."""
    match = SPEC.match(spec.strip())
    if not match:
        raise GuidanceError(f"cannot read the guidance {spec!r}; write NAME=VALUE[:SCALE], for example "
                            "color=#55FFAA:40 or clip=\"a red rose\":8")
    name = {"colour": "color"}.get(match["name"].lower(), match["name"].lower())
    value = match["value"].strip().strip("'\"")
    if name not in TERMS:
        raise GuidanceError(f"unknown guidance term {match['name']!r}; choose one of: {', '.join(TERMS)}")
    try:
        scale = float(match["scale"]) if match["scale"] else None
        window = (float(match["start"]), float(match["end"])) if match["start"] else (0.0, 1.0)
    except ValueError:
        raise GuidanceError(f"cannot read the numbers in the guidance {spec!r}; "
                            "write NAME=VALUE:SCALE@START-END/EVERY, as in color=red:40@0-0.5/2") from None
    timing = {"window": window, "every": int(match["every"]) if match["every"] else 1}
    if name in ("color", "classifier") and ":" in value:  # neither a colour nor a class has a colon: a bad scale
        raise GuidanceError(f"the scale {value.rsplit(':', 1)[1]!r} in the guidance {spec!r} is not a number; "
                            "write NAME=VALUE:SCALE with a finite number, as in color=#55FFAA:40")
    if name == "color":
        return color_guidance(parse_color(value), DEFAULT_COLOR_SCALE if scale is None else scale, **timing)
    if name == "clip":
        return clip_guidance(value, clip, DEFAULT_CLIP_SCALE if scale is None else scale, cuts, **timing)
    if name == "image":
        return image_guidance(value, clip, DEFAULT_IMAGE_SCALE if scale is None else scale, cuts, **timing)
    if classifier is None:
        raise GuidanceError("classifier guidance needs a classifier: in Python pass classifier=; on the command "
                            "line the model's training data must be readable (or give --classifier-data)")
    trained = classifier() if callable(classifier) and not isinstance(classifier, torch.nn.Module) else classifier
    names = list(getattr(trained, "class_names", []))
    network = getattr(trained, "network", trained)
    if value in names:
        index = names.index(value)
    elif value.isdigit() and (not names or int(value) < len(names)):
        index = int(value)
    else:
        raise GuidanceError(f"the classifier has no class {value!r}" +
                            (f"; choose one of: {', '.join(names[:12])}" if names else "; give a class index"))
    return classifier_guidance(network, index, DEFAULT_CLASSIFIER_SCALE if scale is None else scale, **timing)
