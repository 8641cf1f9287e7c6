"""The measuring networks the quickstarts need ship with difflab (metrics/readers/), so that a fresh machine
does not train them first; they are found under the cache's own names, read what they should, and give way
to the cache."""

from __future__ import annotations

import pytest
import torch

from difflab.data import NATIVE_SIZE as TRAINING_SIZE
from difflab.data import open_dataset
from difflab.data.shapes import NATIVE_SIZE, draw_scenes
from difflab.metrics import attributes, classifier
from difflab.metrics.evaluate import Evaluator
from difflab.metrics.trained import SHIPPED


@pytest.fixture
def nothing_trains(tmp_path, monkeypatch):
    """An empty cache, and training either network fails the test."""
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "empty-cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("trained a network that ships with difflab (run bench/ship_readers.py)")

    monkeypatch.setattr(attributes, "train_attributes", refuse)
    monkeypatch.setattr(classifier, "train_classifier", refuse)


def test_the_shapes_reader_ships_and_reads_images_it_never_saw(nothing_trains):
    assert attributes.attributes_cached(NATIVE_SIZE)  # what quickstart --text's plan asks
    reader = attributes.load_or_train_attributes(NATIVE_SIZE)
    images, scenes = draw_scenes(300, NATIVE_SIZE, seed=4242)  # neither its training nor its test data
    shares = attributes.adherence(images.float() / 127.5 - 1, scenes, reader)
    assert min(shares[name] for name in ("colour", "shape", "position")) >= 0.98


def test_the_digits_yardstick_ships_for_the_quickstarts_data(nothing_trains):
    evaluator = Evaluator.for_data("digits", TRAINING_SIZE["digits"], 1)  # what `difflab quickstart` asks
    test = open_dataset("digits", TRAINING_SIZE["digits"], 1, split="test")
    predictions = evaluator.classifier.features_and_predictions(test.batch(torch.arange(len(test)))["images"])[1]
    assert (predictions == test.labels).float().mean().item() >= 0.95  # chance is 0.1


def test_only_what_the_quickstarts_need_ships():
    names = sorted(path.name for path in SHIPPED.iterdir())
    assert len(names) == 4 and {n.split("-")[0] for n in names} == {"attributes", "classifier"}


def test_the_cache_comes_before_what_ships(tmp_path, monkeypatch):
    from difflab.metrics.trained import save_cached

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    with torch.random.fork_rng():
        torch.manual_seed(7)
        other = attributes.AttributeNet()  # untrained: reads nothing right
    save_cached(attributes.reader_stem(NATIVE_SIZE, {}), other, {"test_accuracy": {"all": 0.0}}, "attribute reader")
    reader = attributes.load_or_train_attributes(NATIVE_SIZE)
    assert reader.test_accuracy == {"all": 0.0}
    assert torch.equal(next(reader.network.parameters()), next(other.parameters()))
