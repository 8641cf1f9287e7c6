"""The attribute reader behind prompt adherence on `shapes`: trained, cached, and judging fairly."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_READER as TINY
from difflab.data.shapes import Scene, Shape, draw_scenes
from difflab.errors import DataError
from difflab.metrics import attributes
from difflab.metrics.attributes import AttributeClassifier, AttributeNet, adherence, load_or_train_attributes


@pytest.fixture(scope="module")
def reader(shapes_reader) -> AttributeClassifier:
    return shapes_reader


def as_input(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


class Oracle(AttributeClassifier):
    """Reads exactly the scenes it is given (to test the judging without a trained network)."""

    def __init__(self, shown: list[Scene]):
        super().__init__(AttributeNet(), 8, {"colour": 1.0})
        self.shown = shown

    def outputs(self, images, batch_size=500):
        y = attributes.targets(self.shown)
        out = {"presence": y["presence"] * 20 - 10,
               "background": torch.nn.functional.one_hot(y["background"], len(attributes.BACKGROUND_NAMES)) * 10.0}
        for name, count in (("colour", 6), ("shape", 3), ("size", 2)):
            out[name] = torch.nn.functional.one_hot(y[name].clamp(min=0), count) * 10.0
        return out


def scene(*shapes, background="white"):
    return Scene(tuple(Shape(*s) for s in shapes), background)


def test_judging_counts_each_stated_attribute_apart():
    shown = [scene(("circle", "red", "top left", "small")),
             scene(("square", "blue", "centre", "large"), background="black"),
             scene(("circle", "red", "top left", "small"), ("triangle", "green", "bottom right", "large")),
             scene(("triangle", "green", "top right", "small"))]
    prompts = [scene(("circle", "red", "top left", "small")),  # all right
               "a large red square at the bottom left on a black background",  # colour and position wrong
               scene(("circle", "red", "top left", None), ("triangle", "green", "top right", None)),  # 2nd missing
               "a green triangle"]  # held out; position, size and background not stated
    result = adherence(torch.zeros(4, 3, 8, 8), prompts, Oracle(shown))
    assert result["n"] == 4
    # colour: right, wrong, wrong (nothing where the green triangle should be), right
    assert result["colour"] == 0.5 and result["shape"] == 0.75 and result["position"] == round(1 / 3, 4)
    assert result["size"] == 1.0 and result["background"] == 1.0 and result["all"] == 0.5
    assert result["held_out"] == {"n": 2, "colour": 0.5, "shape": 0.5, "position": 0.0, "background": 1.0, "all": 0.5}
    assert result["seen"]["n"] == 2 and result["seen"]["colour"] == 0.5
    assert result["classifier_test_accuracy"] == {"colour": 1.0}


def test_the_reader_reads_drawn_images(reader):
    assert reader.test_accuracy["colour"] > 0.9 and reader.test_accuracy["position"] > 0.9
    images, scenes = draw_scenes(200, 16, seed=99)  # one shape each, every combination
    x = as_input(images)
    right = adherence(x, [s.caption for s in scenes], reader)
    assert right["colour"] > 0.9 and right["position"] > 0.9 and right["background"] > 0.9
    assert right["held_out"]["n"] > 0 and right["seen"]["n"] + right["held_out"]["n"] == 200
    colours = ["red", "orange", "yellow", "green", "blue", "purple"]
    recoloured = [Scene((Shape(s.shapes[0].shape, colours[(colours.index(s.shapes[0].colour) + 3) % 6],
                               s.shapes[0].position, s.shapes[0].size),), s.background) for s in scenes]
    wrong = adherence(x, recoloured, reader)
    assert wrong["colour"] < 0.1 and wrong["position"] == right["position"]
    read = reader.read(x[:20])
    assert sum(r.shapes[0].colour == s.shapes[0].colour for r, s in zip(read, scenes[:20])) >= 18
    assert reader.features(x[:5]).shape == (5, 128)


def test_the_reader_is_cached(reader, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(attributes, "train_attributes", no_training)
    again = load_or_train_attributes(16, **TINY)
    assert again.test_accuracy == reader.test_accuracy
    x = as_input(draw_scenes(8, 16, seed=3)[0])
    assert torch.equal(again.outputs(x)["colour"], reader.outputs(x)["colour"])


def test_images_the_reader_cannot_take(reader):
    with pytest.raises(DataError, match="RGB images of 16x16 pixels, not \\(1, 16, 16\\)"):
        reader.outputs(torch.zeros(2, 1, 16, 16))
    with pytest.raises(DataError, match="RGB images of 16x16"):
        reader.outputs(torch.zeros(2, 3, 32, 32))


def test_one_prompt_per_image():
    with pytest.raises(DataError, match="3 images but 2 prompts"):
        adherence(torch.zeros(3, 3, 8, 8), ["a red circle", "a blue square"], Oracle([]))
