"""`shapes`: a built-in captioned dataset, generated on the fly.

Each image holds one shape (or, with `objects=2`, one or two) drawn with PIL: a circle, square or
triangle in one of six named colours, small or large, at a named position, on a white, black or
grey background; its caption says exactly that ("a small red circle at the top left on a white
background") and its attributes (a `Scene`) say it in structured form, for measurement.

Every image is drawn from its own generator, seeded by (seed, index): the data is the same on every
machine, `shapes:1000` is the first thousand images of `shapes:5000`, and a few thousand 32x32 images
take a second or two. Images are drawn at four times the size and downsampled (antialiased).

Generalisation to unseen combinations is measurable: the colour-shape pairs in `HELD_OUT` (every
green triangle, purple circle and yellow square) never appear in the training split, while each of
their colours and shapes does, with other partners. Positions 9, 19, ... form the test split, drawn
from every combination (held-out ones included, at their natural rate); the training split redraws
an image until it has no held-out pair. Held-out pairs are colour and shape only, so mirroring an
image (--flip, which also swaps left and right in its caption) never makes one.

Spec: `shapes` (5,000 images), `shapes:N`, or `shapes:n=N,seed=S,objects=2`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from difflab.data.dataset import ImageDataset, match_channels, split_indices
from difflab.errors import DataError

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 30),
    "green": (40, 170, 60), "blue": (40, 80, 220), "purple": (150, 60, 190),
}
POSITIONS = ("top left", "top right", "centre", "bottom left", "bottom right")
CORNERS = ("top left", "top right", "bottom left", "bottom right")  # two-shape images use distinct corners
SIZES = ("small", "large")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}
HELD_OUT = (("green", "triangle"), ("purple", "circle"), ("yellow", "square"))  # (colour, shape): never trained on

DEFAULT_COUNT = 5000
NATIVE_SIZE = 32
SUPERSAMPLE = 4
CENTRES = {"top left": (0.26, 0.26), "top right": (0.74, 0.26), "centre": (0.5, 0.5),
           "bottom left": (0.26, 0.74), "bottom right": (0.74, 0.74)}
RADIUS = {"small": 0.11, "large": 0.19}  # half the shape's extent, as a share of the image side
JITTER = 0.03  # centres move by up to this share of the side; radii by up to ±10%
PHRASE = {"top left": "at the top left", "top right": "at the top right", "centre": "in the centre",
          "bottom left": "at the bottom left", "bottom right": "at the bottom right"}


@dataclass(frozen=True)
class Shape:
    """One shape's attributes; None where unknown (a prompt that does not say)."""

    shape: str
    colour: str
    position: str | None = None
    size: str | None = None

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT

    @property
    def phrase(self) -> str:
        words = " ".join(w for w in ("a", self.size, self.colour, self.shape) if w)
        return f"{words} {PHRASE[self.position]}" if self.position else words


@dataclass(frozen=True)
class Scene:
    """What one image shows: its shapes and background (None where unknown)."""

    shapes: tuple[Shape, ...]
    background: str | None = None

    @property
    def held_out(self) -> bool:
        """Whether any of its shapes is a held-out colour-shape pair."""
        return any(s.held_out for s in self.shapes)

    @property
    def caption(self) -> str:
        text = " and ".join(s.phrase for s in self.shapes)
        return f"{text} on a {self.background} background" if self.background else text


def is_held_out(attributes: Scene | Shape | tuple[str, str]) -> bool:
    """Whether a scene, a shape or a (colour, shape) pair is among the held-out combinations."""
    if isinstance(attributes, tuple):
        return attributes in HELD_OUT
    return attributes.held_out


# ---- drawing ---------------------------------------------------------------------------------------

def sample_scene(rng: np.random.Generator, objects: int = 1, held_out: str = "include") -> Scene:
    """Uniform attributes: `held_out` is include (any pair), exclude (none of HELD_OUT) or only (at least
    one shape of HELD_OUT)."""
    while True:
        count = 1 if objects == 1 else int(rng.integers(1, objects + 1))
        positions = [POSITIONS[rng.integers(len(POSITIONS))]] if count == 1 else \
            [CORNERS[i] for i in rng.choice(len(CORNERS), count, replace=False)]
        shapes = tuple(Shape(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                             position, SIZES[rng.integers(len(SIZES))]) for position in positions)
        scene = Scene(shapes, list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])
        if held_out == "include" or (held_out == "only") == scene.held_out:
            return scene


def render(scene: Scene, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as a uint8 [size, size, 3] array; `rng` jitters centres and sizes (None: exact)."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background or "white"])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        cx, cy = CENTRES[shape.position or "centre"]
        r = RADIUS[shape.size or "large"]
        if rng is not None:
            dx, dy, scale = rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER), rng.uniform(0.9, 1.1)
            cx, cy, r = cx + dx, cy + dy, r * scale
        cx, cy, r = cx * side, cy * side, r * side
        fill = COLOURS[shape.colour]
        if shape.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.shape == "square":
            h = 0.88 * r  # about the circle's area
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:  # an equilateral triangle pointing up, its box centred on the shape's centre
            big = 1.15 * r
            cy += big / 4
            w = big * 0.8660254
            draw.polygon([(cx, cy - big), (cx + w, cy + big / 2), (cx - w, cy + big / 2)], fill=fill)
    return np.array(image.reduce(SUPERSAMPLE))


def draw_scenes(count: int, size: int = NATIVE_SIZE, seed: int = 0, objects: int = 1,
                held_out: str = "include") -> tuple[torch.Tensor, list[Scene]]:
    """`count` images (uint8 [count, 3, size, size]) and their scenes, drawn with `held_out` as in
    sample_scene: items 0 … count-1 of the stream seeded by `seed`."""
    return _draw(range(count), size, seed, objects, lambda index: held_out)


def _draw(indices, size: int, seed: int, objects: int, held_out) -> tuple[torch.Tensor, list[Scene]]:
    scenes, arrays = [], []
    for index in indices:
        rng = np.random.default_rng([seed, index])  # each item its own generator: any size, same items
        scene = sample_scene(rng, objects, held_out(index))
        scenes.append(scene)
        arrays.append(render(scene, size, rng))
    if not arrays:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8), []
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), scenes


# ---- the dataset -----------------------------------------------------------------------------------

def parse_spec(arg: str) -> dict[str, int]:
    """'' | 'N' | 'n=N,seed=S,objects=K' -> {n, seed, objects}."""
    settings = {"n": DEFAULT_COUNT, "seed": 0, "objects": 1}
    usage = "use shapes, shapes:N or shapes:n=N,seed=S,objects=1|2 (for example shapes:2000)"
    for i, part in enumerate(p.strip() for p in arg.split(",") if p.strip()):
        key, eq, value = part.partition("=")
        if not eq and i == 0:
            key, value = "n", key
        if key not in settings or not re.fullmatch(r"\d+", value.strip()):
            raise DataError(f"cannot read the shapes spec 'shapes:{arg}'; {usage}")
        settings[key] = int(value)
    if settings["n"] < 1 or settings["objects"] not in (1, 2):
        raise DataError(f"shapes:{arg} asks for {settings['n']} images of up to {settings['objects']} shapes; "
                        "give at least 1 image and objects=1 or 2")
    return settings


def mirror_caption(caption: str) -> str:
    """The caption of the mirrored image: left and right swap."""
    return re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", caption)


def load_shapes(arg: str, image_size: int | None, channels: int | None, split: str) -> ImageDataset:
    settings = parse_spec(arg)
    size = image_size or NATIVE_SIZE
    index = split_indices(settings["n"], split).tolist()
    if not index:
        raise DataError(f"shapes:{arg} has too few images for a '{split}' split; ask for more (shapes:N)")
    # training positions never hold a held-out pair; test positions (9, 19, ...) hold any
    images, scenes = _draw(index, size, settings["seed"], settings["objects"],
                           lambda i: "include" if i % 10 == 9 else "exclude")
    images = match_channels(images, channels or 3)
    return ImageDataset(images, source=f"shapes:{arg}" if arg else "shapes", captions=[s.caption for s in scenes],
                        attributes=scenes, mirror_caption=mirror_caption)


# ---- reading attributes back from a caption -------------------------------------------------------

_COLOUR = "|".join(COLOURS)
_SHAPE = "circle|square|triangle|disc|disk|box|rectangle"
_SYNONYMS = {"disc": "circle", "disk": "circle", "box": "square", "rectangle": "square", "gray": "grey",
             "center": "centre", "middle": "centre", "upper": "top", "lower": "bottom", "big": "large",
             "tiny": "small"}
_OBJECT = re.compile(
    rf"\b(?:(small|large|big|tiny)\s+)?({_COLOUR})\s+({_SHAPE})s?\b"
    r"(?:\s+(?:at|in|on)\s+the\s+((?:top|upper|bottom|lower)\s+(?:left|right)|centre|center|middle))?")
_BACKGROUND = re.compile(r"\bon\s+an?\s+(white|black|grey|gray)\s+background\b")


def parse_caption(caption: str) -> Scene:
    """The attributes a caption states ("a small red circle at the top left on a white background"),
    in the words of `shapes` captions and a few synonyms (center, gray, upper/lower, big/tiny, disc,
    box); what it does not say is None. A caption that names no coloured shape is a DataError."""
    text = " ".join(caption.lower().split())

    def norm(word: str | None) -> str | None:
        if word is None:
            return None
        return " ".join(_SYNONYMS.get(w, w) for w in word.split())

    shapes = tuple(Shape(norm(m.group(3)), m.group(2), norm(m.group(4)), norm(m.group(1)))
                   for m in _OBJECT.finditer(text))
    if not shapes:
        raise DataError(f"cannot read a coloured shape from the caption {caption!r}; write it like "
                        "'a small red circle at the top left on a white background'")
    background = _BACKGROUND.search(text)
    return Scene(shapes, norm(background.group(1)) if background else None)
