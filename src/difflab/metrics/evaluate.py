"""Evaluate a model against held-out real images: Fréchet distance, class accuracy, and the yardsticks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from difflab.data import ImageDataset, open_dataset
from difflab.data.captions import template_captions
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.errors import DataError
from difflab.metrics.classifier import TrainedClassifier, load_or_train
from difflab.metrics.frechet import frechet_distance
from difflab.models.codec import round_trip
from difflab.models.model import DiffusionModel

log = logging.getLogger("difflab")


@dataclass
class Evaluator:
    """Everything about the real data an evaluation needs, prepared once (reused during training)."""

    data_spec: str
    train: ImageDataset
    test: ImageDataset
    classifier: TrainedClassifier | None  # None for unlabelled data
    extractor: object | None = None  # None: the classifier's features; else e.g. ClipFeatures
    _test_features: torch.Tensor | None = None

    @classmethod
    def for_data(cls, spec: str, image_size: int, channels: int, features: str | None = "classifier",
                 unlabelled: str | None = None, captioned: bool = False) -> Evaluator:
        """`features`: "classifier" or "clip:PATH_OR_ID"; None: the classifier, or on data without labels the
        `unlabelled` feature space (a CLIP model the user gave for its score). `captioned`: the held-out
        images must have captions (checked before a classifier trains for minutes)."""
        train = open_dataset(spec, image_size, channels, split="train")
        test = open_dataset(spec, image_size, channels, split="test")
        if captioned:
            test_captions(test, spec)
        classifier = load_or_train(spec, train, test) if train.has_labels and test.has_labels else None
        if features is None:
            features = unlabelled if classifier is None and unlabelled else "classifier"
        extractor = cls.extractor_for(features)
        if extractor is None and classifier is None:
            raise DataError(f"{spec} has no labels to train the evaluation classifier on; give --features "
                            "clip:PATH (a CLIP model's image embeddings) for unlabelled data")
        return cls(spec, train, test, classifier, extractor)

    @staticmethod
    def extractor_for(features: str):
        """The feature extractor --features names (None: the classifier's features)."""
        if features.startswith("clip:"):
            from difflab.metrics.clip_features import ClipFeatures

            return ClipFeatures(features.split(":", 1)[1])
        if features != "classifier":
            raise DataError(f"unknown feature space {features!r}; use classifier or clip:PATH_OR_ID")
        return None

    @property
    def feature_space(self) -> str:
        return self.extractor.name if self.extractor is not None else "classifier"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> feature vectors."""
        if self.extractor is not None:
            return self.extractor(images)
        return self.classifier.features_and_predictions(images)[0]

    def test_features(self) -> torch.Tensor:
        if self._test_features is None:
            self._test_features = self.features(self.test.batch(torch.arange(len(self.test)))["images"])
        return self._test_features

    def real_batch(self, n: int, seed: int = 0) -> dict:
        """n training images (and their labels), the same for the same seed."""
        index = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))[:n]
        return self.train.batch(index)

    def floor(self, n: int, seed: int = 0) -> float:
        """The same distance for n real training images: what a perfect model would score."""
        return self.distance(self.real_batch(n, seed)["images"])

    def distance(self, images: torch.Tensor) -> float:
        """The Fréchet distance of images in [-1, 1] to the held-out test images."""
        return round(frechet_distance(self.features(images).numpy(), self.test_features().numpy()), 4)

    def vae_ceiling(self, model: DiffusionModel, n: int, seed: int = 0) -> dict:
        """What a latent model's VAE lets through: the floor's n real images, encoded and decoded, measured
        as generated images are. The model cannot draw better than its VAE keeps."""
        batch = self.real_batch(n, seed)
        rebuilt = round_trip(model.codec, batch["images"], seed)
        result = {"frechet_distance": self.distance(rebuilt)}
        if self.classifier is not None and batch.get("labels") is not None:
            predictions = self.classifier.features_and_predictions(rebuilt)[1]
            result["class_accuracy"] = round((predictions == batch["labels"]).float().mean().item(), 4)
        return result

    def __call__(self, model: DiffusionModel, n: int, *, sampler: str, steps: int, cfg_scale: float | None,
                 cfg_interval=None, cfg_rescale: float | None = None, seed: int = 0, batch_size: int = 250,
                 progress: bool = False,
                 caption_template: str | None = None, clip=None, prompts: list[str] | None = None) -> dict:
        """`caption_template`: a text model trained on labelled data with this template is asked for each
        class by its caption, and measured like a class-conditional model. `prompts`: a text model is asked
        for these (say, the held-out images' own captions: `held_out_captions`)."""
        started = time.perf_counter()
        class_names = None if prompts else model.class_names
        if caption_template and self.classifier is not None and not prompts:
            class_names = self.classifier.class_names
        labels = torch.arange(n) % len(class_names) if class_names else None
        if caption_template and labels is not None:
            prompts = template_captions(caption_template, labels.tolist(), class_names)
        cfg_scale = model.default_cfg_scale if cfg_scale is None else cfg_scale
        request = GenerationRequest(n, sampler=sampler, steps=steps, seed=seed, cfg_scale=cfg_scale,
                                    cfg_interval=cfg_interval, cfg_rescale=cfg_rescale,
                                    class_labels=None if prompts else labels, prompts=prompts)
        images = generate(model, request, batch_size=batch_size, progress=progress) * 2 - 1
        result = {
            "n": n,
            "frechet_distance": self.distance(images),
            "feature_space": self.feature_space,
            "sampler": sampler, "steps": steps, "seed": seed,
        }
        if labels is not None and self.classifier is not None:
            if list(class_names) != self.classifier.class_names:
                raise DataError(f"the model's classes ({', '.join(class_names[:5])}, ...) are not those of "
                                f"{self.data_spec}; evaluate it on the data it was trained on")
            predictions = self.classifier.features_and_predictions(images)[1]
            correct = predictions == labels
            result.update(request.run_guidance(model).settings(include_scale=True))
            result["class_accuracy"] = round(correct.float().mean().item(), 4)
            result["class_accuracy_per_class"] = {
                name: round(correct[labels == i].float().mean().item(), 4) for i, name in enumerate(class_names)
            }
        if clip is not None and prompts:
            from difflab.metrics.clip_score import clip_score

            result["clip_score"] = clip_score(clip, images, prompts)
            if self.test.has_captions:  # the yardstick: the held-out images against their own captions
                captioned = [i for i, c in enumerate(self.test.captions) if c]
                if captioned:
                    real = self.test.batch(torch.tensor(captioned))["images"]
                    result["clip_score_real"] = clip_score(clip, real, [self.test.captions[i] for i in captioned])
        if self.classifier is not None:
            result["classifier_test_accuracy"] = round(self.classifier.test_accuracy, 4)
        result["seconds"] = round(time.perf_counter() - started, 1)
        return result


def held_out_captions(evaluator: Evaluator, n: int) -> list[str]:
    """`n` prompts for a text model evaluated on its own captioned data: the held-out images' captions, in
    turn, so its images are compared with the images those captions describe."""
    captions = test_captions(evaluator.test, evaluator.data_spec)
    return [captions[i % len(captions)] for i in range(n)]


def test_captions(test, spec: str) -> list[str]:
    """The held-out images' captions; a one-line DataError where they have none."""
    captions = [c for c in (test.captions or []) if c] if test.has_captions else []
    if not captions:
        raise DataError(f"the held-out images of {spec} have no captions to prompt a text model with; "
                        "give --data captioned images (metadata.jsonl or IMAGE.txt)")
    return captions


def summary_line(result: dict) -> str:
    parts = [f"Fréchet distance {result['frechet_distance']:.3f} ({result['feature_space']} features"]
    if "frechet_floor" in result:
        parts[0] += f"; real-data floor {result['frechet_floor']:.3f}"
    parts[0] += ")"
    if "class_accuracy" in result:
        parts.append(f"class accuracy {100 * result['class_accuracy']:.1f}%")
    if "frechet_distance" in (ceiling := result.get("vae_ceiling", {})):
        accuracy = f", class accuracy {100 * ceiling['class_accuracy']:.1f}%" if "class_accuracy" in ceiling else ""
        parts.append(f"the VAE's reconstructions: Fréchet distance {ceiling['frechet_distance']:.3f}{accuracy}")
    if "clip_score" in result:
        real = f" (real images: {result['clip_score_real']:.2f})" if "clip_score_real" in result else ""
        parts.append(f"CLIP score {result['clip_score']:.2f}{real}")
    if "classifier_test_accuracy" in result:
        parts.append(f"yardstick classifier {100 * result['classifier_test_accuracy']:.1f}% on held-out images")
    parts.append(f"n={result['n']}, {result['sampler']} {result['steps']} steps")
    return " · ".join(parts)
