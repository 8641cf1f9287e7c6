"""The yardstick: a small CNN trained on the real labelled data.

Its penultimate layer is the feature space of difflab's Fréchet distance, and its predictions give
the class accuracy of generated images. It is trained once per dataset, image size and channel
count, and cached; its own held-out accuracy is reported beside every figure, so the yardstick's
quality is visible.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from difflab.data.dataset import ImageDataset
from difflab.metrics.trained import cache_dir, cache_stem, fit, load_cached, save_cached

__all__ = ["EvalClassifier", "TrainedClassifier", "train_classifier", "load_or_train", "cache_dir"]

log = logging.getLogger("difflab")

ARCHITECTURE_VERSION = 1  # bump when the network or its training changes, to retrain cached ones
MIN_STEPS = 1500  # training steps at least (and at least three epochs)


class EvalClassifier(nn.Module):
    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.SiLU()]

        self.body = nn.Sequential(
            *block(channels, width, 1), *block(width, width, 1),
            *block(width, 2 * width, 2), *block(2 * width, 2 * width, 1),
            *block(2 * width, 4 * width, 2), *block(4 * width, 4 * width, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1] -> [N, 4·width] features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class TrainedClassifier:
    network: EvalClassifier
    test_accuracy: float
    class_names: list[str]

    @torch.no_grad()
    def features_and_predictions(self, images: torch.Tensor,
                                 batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """`images` in [-1, 1]."""
        self.network.eval()
        features, predictions = [], []
        for chunk in images.split(batch_size):
            f = self.network.features(chunk)
            features.append(f)
            predictions.append(self.network.head(f).argmax(1))
        return torch.cat(features), torch.cat(predictions)


def _shift(x: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translations by up to `pixels`, so the classifier does not depend on exact centring."""
    padded = F.pad(x, [pixels] * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def train_classifier(train: ImageDataset, test: ImageDataset, steps: int | None = None, batch_size: int = 128,
                     seed: int = 0) -> TrainedClassifier:
    """At least MIN_STEPS steps and three epochs; AdamW with a one-cycle learning rate."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = EvalClassifier(train.channels, len(train.class_names))
    steps = steps or max(MIN_STEPS, -(-3 * len(train) // batch_size))

    def loss_at(step: int) -> torch.Tensor:
        index = torch.randint(0, len(train), (batch_size,), generator=generator)
        batch = train.batch(index)
        return F.cross_entropy(network(_shift(batch["images"], generator)), batch["labels"])

    trained = TrainedClassifier(fit(network, steps, loss_at, "training the evaluation classifier"), 0.0,
                                list(train.class_names))
    _, predictions = trained.features_and_predictions(test.batch(torch.arange(len(test)))["images"])
    trained.test_accuracy = (predictions == test.labels).float().mean().item()
    return trained


def load_or_train(data_spec: str, train: ImageDataset, test: ImageDataset) -> TrainedClassifier:
    key = [os.path.abspath(data_spec) if Path(data_spec).exists() else data_spec, train.image_size,
           train.channels, len(train), len(test), ARCHITECTURE_VERSION]
    stem = cache_stem(data_spec, "classifier", key)
    what = "evaluation classifier"
    cached = load_cached(stem, lambda info: EvalClassifier(train.channels, len(info["class_names"])), what)
    if cached is not None:
        network, info = cached
        return TrainedClassifier(network, info["test_accuracy"], info["class_names"])
    log.info("training the evaluation classifier on %s (once; cached in %s)", data_spec, stem.parent)
    trained = train_classifier(train, test)
    save_cached(stem, trained.network, {"test_accuracy": trained.test_accuracy, "class_names": trained.class_names,
                                        "data": data_spec}, what)
    return trained
