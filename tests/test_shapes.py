"""The built-in `shapes` data: generated, seeded, captioned, with held-out combinations."""

from __future__ import annotations

import pytest
import torch

from difflab.data import BatchStream, open_dataset
from difflab.data.shapes import (
    COLOURS,
    HELD_OUT,
    Scene,
    Shape,
    draw_scenes,
    is_held_out,
    mirror_caption,
    parse_caption,
    render,
)
from difflab.errors import DataError


def test_shapes_are_seeded_captioned_and_any_size():
    data = open_dataset("shapes:200", split="all")
    assert len(data) == 200 and data.images.shape[1:] == (3, 32, 32) and data.has_captions and not data.has_labels
    again = open_dataset("shapes:400", split="all")  # the same seed: the first 200 are the same images
    assert torch.equal(again.images[:200], data.images) and again.captions[:200] == data.captions
    other = open_dataset("shapes:n=200,seed=1", split="all")
    assert not torch.equal(other.images, data.images)
    assert data.captions == [scene.caption for scene in data.attributes]
    assert len(set(data.captions)) > 100  # 540 combinations to draw from
    small = open_dataset("shapes:20", image_size=16, channels=1, split="all")
    assert small.images.shape == (20, 1, 16, 16)
    assert len(open_dataset("shapes")) == 4500  # 5,000, less the test tenth


def test_captions_say_what_is_drawn():
    scene = Scene((Shape("square", "blue", "top left", "large"),), "white")
    assert scene.caption == "a large blue square at the top left on a white background"
    image = torch.from_numpy(render(scene, 32)).permute(2, 0, 1).float()
    top_left, bottom_right = image[:, 4:12, 4:12], image[:, 20:28, 20:28]
    assert torch.allclose(top_left.mean((1, 2)), torch.tensor(COLOURS["blue"], dtype=torch.float), atol=2)
    assert (bottom_right == 255).all()  # background
    two = Scene((Shape("circle", "red", "top left", "small"), Shape("triangle", "blue", "bottom right", "large")),
                "black")
    assert two.caption == ("a small red circle at the top left and a large blue triangle at the bottom right "
                           "on a black background")


def test_held_out_combinations_never_appear_in_training_but_do_in_test():
    train = open_dataset("shapes:3000", split="train")
    test = open_dataset("shapes:3000", split="test")
    assert not any(scene.held_out for scene in train.attributes)
    assert not any(f"{colour} {shape}" in c for c in train.captions for colour, shape in HELD_OUT)
    held = [scene for scene in test.attributes if scene.held_out]
    assert 0 < len(held) < len(test) / 3  # at their natural rate (3 of 18 pairs)
    seen_pairs = {(s.colour, s.shape) for scene in train.attributes for s in scene.shapes}
    assert len(seen_pairs) == 18 - len(HELD_OUT)  # every other pair, so every colour and shape is seen
    assert is_held_out(("green", "triangle")) and not is_held_out(Shape("triangle", "red"))
    images, scenes = draw_scenes(30, 16, seed=5, held_out="only")
    assert images.shape == (30, 3, 16, 16) and all(scene.held_out for scene in scenes)


def test_two_shapes_per_image_on_request():
    data = open_dataset("shapes:n=100,objects=2", split="all")
    counts = [len(scene.shapes) for scene in data.attributes]
    assert set(counts) == {1, 2}
    assert all(len({s.position for s in scene.shapes}) == len(scene.shapes) for scene in data.attributes)


def test_a_mirrored_image_has_left_and_right_swapped_in_its_caption():
    assert mirror_caption("a red circle at the top left and a blue square at the bottom right") == \
        "a red circle at the top right and a blue square at the bottom left"
    data = open_dataset("shapes:64", split="all")
    plain, flipped = next(BatchStream(data, 64, seed=0)), next(BatchStream(data, 64, seed=0, flip=True))
    changed = [i for i in range(64) if not torch.equal(plain["images"][i], flipped["images"][i])]
    assert changed
    assert all(flipped["captions"][i] == mirror_caption(plain["captions"][i]) for i in changed)
    assert all(flipped["captions"][i] == plain["captions"][i] for i in range(64) if i not in changed)


def test_captions_parse_back_into_attributes():
    data = open_dataset("shapes:n=200,objects=2", split="all")
    assert all(parse_caption(c) == scene for c, scene in zip(data.captions, data.attributes))
    loose = parse_caption("A big Red disc in the center, on a gray background")
    assert loose == Scene((Shape("circle", "red", "centre", "large"),), "grey")
    assert parse_caption("two green triangles") == Scene((Shape("triangle", "green"),))


def test_a_caption_without_a_coloured_shape_cannot_be_parsed():
    with pytest.raises(DataError, match="cannot read a coloured shape from the caption 'a photo of a cat'"):
        parse_caption("a photo of a cat")


@pytest.mark.parametrize("spec", ["shapes:abc", "shapes:n=0", "shapes:objects=3", "shapes:size=4"])
def test_bad_shapes_specs(spec):
    with pytest.raises(DataError, match="shapes"):
        open_dataset(spec)
