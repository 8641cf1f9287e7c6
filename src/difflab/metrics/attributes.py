"""Prompt adherence on `shapes`: a small CNN reads what an image shows, and it is compared with what
its prompt asked for.

The reader looks at each of the five positions of `shapes` (a slot each) and says whether a shape is
there, and if so its colour, kind and size; and it reads the background. It is trained by difflab
on freshly generated `shapes` images (every combination, the held-out ones included: it is the
instrument, not the model under test; one or two shapes per image), with noise, blur and small
colour shifts so that generated images read like drawn ones. It is cached like the class-accuracy
yardstick, and its accuracy on fresh images it never saw is reported beside every figure.

`adherence(images, prompts)` gives, for each attribute a prompt states (colour, shape, position,
size, background), the share of images that show it, overall and apart for prompts with seen and
with held-out combinations. Prompts are `Scene`s or captions (read back by `parse_caption`, so
prompts from anywhere can be scored). A one-shape prompt is compared with the shape the reader is
surest of; a prompt of several shapes with what the reader sees at each named position.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from difflab.data.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, Shape, draw_scenes, parse_caption
from difflab.errors import DataError
from difflab.metrics.trained import cache_stem, fit, load_cached, save_cached, stored_stem

log = logging.getLogger("difflab")

ARCHITECTURE_VERSION = 1  # bump when the network, its data or its training changes, to retrain cached ones
ATTRIBUTES = ("colour", "shape", "position", "size", "background")
COLOUR_NAMES, BACKGROUND_NAMES = list(COLOURS), list(BACKGROUNDS)
SLOT_OUTPUTS = 1 + len(COLOURS) + len(SHAPES) + len(SIZES)  # presence, colour, shape, size
TRAIN_IMAGES, TEST_IMAGES, STEPS, BATCH_SIZE = 6000, 1000, 800, 64
SEED = 1234  # the reader's data is drawn apart from the default `shapes` data (seed 0)


class AttributeNet(nn.Module):
    """A small CNN that keeps a coarse 4x4 map (positions matter) before its heads."""

    def __init__(self, width: int = 24, hidden: int = 128):
        super().__init__()

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.SiLU()]

        self.body = nn.Sequential(
            *block(3, width, 1), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 1),
            *block(2 * width, 4 * width, 2), *block(4 * width, 4 * width, 1),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(4 * width * 16, hidden), nn.SiLU(),
        )
        self.head = nn.Linear(hidden, len(POSITIONS) * SLOT_OUTPUTS + len(BACKGROUNDS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1] -> [N, hidden] features (a feature space for Fréchet distances on shapes)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(self.features(x))
        slots = out[:, :len(POSITIONS) * SLOT_OUTPUTS].view(-1, len(POSITIONS), SLOT_OUTPUTS)
        c, s = 1 + len(COLOURS), 1 + len(COLOURS) + len(SHAPES)
        return {"presence": slots[..., 0], "colour": slots[..., 1:c], "shape": slots[..., c:s],
                "size": slots[..., s:], "background": out[:, len(POSITIONS) * SLOT_OUTPUTS:]}


def targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Per-slot class indices (-100 where no shape is) and the background, from drawn scenes."""
    n, slots = len(scenes), len(POSITIONS)
    out = {"presence": torch.zeros(n, slots)}
    for name in ("colour", "shape", "size"):
        out[name] = torch.full((n, slots), -100, dtype=torch.long)
    out["background"] = torch.tensor([BACKGROUND_NAMES.index(s.background) for s in scenes])
    for i, scene in enumerate(scenes):
        for shape in scene.shapes:
            j = POSITIONS.index(shape.position)
            out["presence"][i, j] = 1.0
            out["colour"][i, j] = COLOUR_NAMES.index(shape.colour)
            out["shape"][i, j] = SHAPES.index(shape.shape)
            out["size"][i, j] = SIZES.index(shape.size)
    return out


def loss(outputs: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    total = F.binary_cross_entropy_with_logits(outputs["presence"], target["presence"])
    total = total + F.cross_entropy(outputs["background"], target["background"])
    for name in ("colour", "shape", "size"):
        logits = outputs[name]
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[name].reshape(-1))
    return total


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What generated images do to drawn ones: noise, blur, slightly shifted colours."""
    n = x.shape[0]
    blurred = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    amount = torch.rand(n, 1, 1, 1, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) < 0.5)
    x = torch.lerp(x, blurred, amount)
    x = x + torch.randn(x.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.12
    x = x + (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.1
    return x.clamp(-1, 1)


@dataclass
class AttributeClassifier:
    network: AttributeNet
    image_size: int
    test_accuracy: dict[str, float] = field(default_factory=dict)  # per attribute, on fresh drawn images

    @torch.no_grad()
    def outputs(self, images: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
        """`images` in [-1, 1], [N, 3, size, size] -> the network's outputs."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.image_size,) * 2:
            raise DataError(f"the attribute reader takes RGB images of {self.image_size}x{self.image_size} pixels, "
                            f"not {tuple(images.shape[1:])}; generate colour images at the size it was trained at")
        self.network.eval()
        parts = [self.network(chunk.float()) for chunk in images.split(batch_size)]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        self.network.eval()
        return torch.cat([self.network.features(chunk.float()) for chunk in images.split(batch_size)])

    def read(self, images: torch.Tensor) -> list[Scene]:
        """What each image shows: the shapes at the positions where the reader sees one (at least the one
        it is surest of), and the background."""
        out = self.outputs(images)
        scenes = []
        for i in range(images.shape[0]):
            present = (out["presence"][i] > 0).nonzero().flatten().tolist() or [int(out["presence"][i].argmax())]
            scenes.append(Scene(tuple(_shape_at(out, i, j) for j in present),
                                BACKGROUND_NAMES[int(out["background"][i].argmax())]))
        return scenes


def _shape_at(out: dict[str, torch.Tensor], i: int, slot: int) -> Shape:
    return Shape(SHAPES[int(out["shape"][i, slot].argmax())], COLOUR_NAMES[int(out["colour"][i, slot].argmax())],
                 POSITIONS[slot], SIZES[int(out["size"][i, slot].argmax())])


def _judge(out: dict[str, torch.Tensor], i: int, prompt: Scene) -> dict[str, bool]:
    """For each attribute the prompt states: whether image i shows it."""
    verdicts: dict[str, list[bool]] = {}
    presence = out["presence"][i]
    for asked in prompt.shapes:
        if len(prompt.shapes) == 1:  # the shape the reader is surest of
            seen, there = _shape_at(out, i, int(presence.argmax())), True
        elif asked.position is not None:  # what is at the named position
            slot = POSITIONS.index(asked.position)
            seen, there = _shape_at(out, i, slot), bool(presence[slot] > 0)
        else:  # the shape that agrees best with it
            slots = (presence > 0).nonzero().flatten().tolist() or [int(presence.argmax())]
            seen = max((_shape_at(out, i, j) for j in slots),
                       key=lambda s: (s.colour == asked.colour) + (s.shape == asked.shape))
            there = True
        for name in ("colour", "shape", "position", "size"):
            if getattr(asked, name) is not None:
                verdicts.setdefault(name, []).append(there and getattr(seen, name) == getattr(asked, name))
    result = {name: all(v) for name, v in verdicts.items()}
    if prompt.background is not None:
        result["background"] = BACKGROUND_NAMES[int(out["background"][i].argmax())] == prompt.background
    return result


def _shares(verdicts: list[dict[str, bool]]) -> dict[str, float]:
    shares = {}
    for name in ATTRIBUTES:
        judged = [v[name] for v in verdicts if name in v]
        if judged:
            shares[name] = round(sum(judged) / len(judged), 4)
    if verdicts:
        shares["all"] = round(sum(all(v.values()) for v in verdicts) / len(verdicts), 4)
    return shares


def as_scene(prompt: Scene | str) -> Scene:
    return prompt if isinstance(prompt, Scene) else parse_caption(prompt)


def adherence(images: torch.Tensor, attributes_list: list[Scene | str],
              classifier: AttributeClassifier | None = None) -> dict:
    """The share of `images` (in [-1, 1], [N, 3, H, W]) that show what their prompts (Scenes or
    captions) ask for: per attribute the prompts state, and `all` (every stated attribute at once);
    under `seen` and `held_out`, the same for prompts without and with held-out combinations; and the
    reader's own accuracy on fresh drawn images (`classifier_test_accuracy`)."""
    if len(attributes_list) != images.shape[0]:
        raise DataError(f"{images.shape[0]} images but {len(attributes_list)} prompts; give one prompt per image")
    prompts = [as_scene(p) for p in attributes_list]
    classifier = classifier or load_or_train_attributes(images.shape[-1])
    out = classifier.outputs(images)
    verdicts = [_judge(out, i, prompt) for i, prompt in enumerate(prompts)]
    result = {"n": len(prompts), **_shares(verdicts)}
    for name, wanted in (("seen", False), ("held_out", True)):
        part = [v for v, p in zip(verdicts, prompts) if p.held_out == wanted]
        if part:
            result[name] = {"n": len(part), **_shares(part)}
    result["classifier_test_accuracy"] = dict(classifier.test_accuracy)
    return result


def train_attributes(image_size: int, train_images: int = TRAIN_IMAGES, test_images: int = TEST_IMAGES,
                     steps: int = STEPS, batch_size: int = BATCH_SIZE, seed: int = SEED) -> AttributeClassifier:
    """Train the reader on `train_images` fresh shapes images (one or two shapes, every combination) and
    measure it on `test_images` others."""
    started = time.perf_counter()
    images, scenes = draw_scenes(train_images, image_size, seed=seed, objects=2)
    x = images.float().div_(127.5).sub_(1.0)
    y = targets(scenes)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = AttributeNet()

    def loss_at(step: int) -> torch.Tensor:
        index = torch.randint(0, len(x), (batch_size,), generator=generator)
        return loss(network(augment(x[index], generator)), {k: v[index] for k, v in y.items()})

    classifier = AttributeClassifier(fit(network, steps, loss_at, "training the attribute reader"), image_size)
    test, truth = draw_scenes(test_images, image_size, seed=seed + 1, objects=2)
    measured = adherence(test.float().div_(127.5).sub_(1.0), truth, classifier)
    classifier.test_accuracy = {name: measured[name] for name in (*ATTRIBUTES, "all")}
    log.info("attribute reader at %d px: %s on %d fresh images (%.0f s)", image_size,
             ", ".join(f"{k} {100 * v:.1f}%" for k, v in classifier.test_accuracy.items()), test_images,
             time.perf_counter() - started)
    return classifier


def reader_stem(image_size: int, settings: dict):
    key = ["attributes", image_size, ARCHITECTURE_VERSION, sorted(settings.items())]
    return cache_stem("shapes", "attributes", key)


def attributes_cached(image_size: int) -> bool:
    """Whether the reader for `image_size` is already trained, cached or shipped (an evaluation will not
    train it)."""
    return stored_stem(reader_stem(image_size, {})) is not None


def load_or_train_attributes(image_size: int, **settings) -> AttributeClassifier:
    """The reader for `image_size`, from the cache (DIFFLAB_CACHE), shipped with difflab (32 px, the default
    settings), or trained once (about a minute at 32x32 on two free CPU cores)."""
    stem = reader_stem(image_size, settings)
    what = "attribute reader"
    cached = load_cached(stem, lambda info: AttributeNet(), what)
    if cached is not None:
        network, info = cached
        return AttributeClassifier(network, image_size, info["test_accuracy"])
    log.info("training the attribute reader for %d px shapes images (once; cached in %s)", image_size, stem.parent)
    classifier = train_attributes(image_size, **settings)
    save_cached(stem, classifier.network, {"test_accuracy": classifier.test_accuracy, "image_size": image_size}, what)
    return classifier
