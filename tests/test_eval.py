"""Evaluation: the Fréchet distance, the yardstick classifier and its cache, difflab eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import conditional_config
from difflab.cli import main
from difflab.data import open_dataset
from difflab.errors import DataError
from difflab.metrics import classifier as classifier_module
from difflab.metrics.evaluate import Evaluator
from difflab.metrics.frechet import frechet_distance
from difflab.storage.folder import load_model


@pytest.fixture(autouse=True)
def quick_classifier(monkeypatch):
    monkeypatch.setattr(classifier_module, "MIN_STEPS", 200)


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    shifted = a + np.array([2.0, 0, 0])
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-6)  # only the means differ
    scaled = a * 3.0  # μb = 3μa, Σb = 9Σa: ‖2μa‖² + Tr(Σa + 9Σa − 2·3Σa) = ‖2μa‖² + 4 Tr(Σa)
    expected = ((2 * a.mean(0)) ** 2).sum() + 4 * np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, scaled) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_agrees_with_scipy_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)), rng.normal(size=(400, 6)) + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_the_yardstick_classifier_learns_and_is_cached(monkeypatch):
    train, test = open_dataset("digits", 8, split="train"), open_dataset("digits", 8, split="test")
    trained = classifier_module.load_or_train("digits", train, test)
    assert trained.test_accuracy > 0.85 and trained.class_names == [str(d) for d in range(10)]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been used")

    monkeypatch.setattr(classifier_module, "train_classifier", no_training)
    again = classifier_module.load_or_train("digits", train, test)
    assert again.test_accuracy == trained.test_accuracy
    x = test.batch(torch.arange(20))["images"]
    assert torch.equal(again.features_and_predictions(x)[1], trained.features_and_predictions(x)[1])


def test_real_images_score_far_better_than_noise():
    evaluator = Evaluator.for_data("digits", 8, 1)
    floor = evaluator.floor(179)
    noise = torch.rand(179, 1, 8, 8) * 2 - 1
    noise_distance = frechet_distance(evaluator.features(noise).numpy(), evaluator.test_features().numpy())
    assert floor * 5 < noise_distance


def test_evaluating_a_conditional_model(conditional_model):
    evaluator = Evaluator.for_data("digits", 8, 1)
    result = evaluator(load_model(conditional_model), 40, sampler="ddim", steps=4, cfg_scale=2.0)
    assert result["n"] == 40 and result["frechet_distance"] > 0
    assert 0 <= result["class_accuracy"] <= 1 and len(result["class_accuracy_per_class"]) == 10
    assert result["classifier_test_accuracy"] > 0.85


def test_eval_command_prints_json_and_a_line(capsys, conditional_model, tmp_path):
    code = main(["eval", "--model", str(conditional_model), "-n", "30", "--steps", "3",
                 "--json", str(tmp_path / "e.json")])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    assert result == json.loads((tmp_path / "e.json").read_text())
    assert {"frechet_distance", "frechet_floor", "class_accuracy", "classifier_test_accuracy", "n"} <= set(result)
    assert result["data"] == "digits" and result["n"] == 30
    assert "Fréchet distance" in captured.err and "class accuracy" in captured.err


def test_evaluation_during_training_is_logged(tmp_path):
    from difflab.training.trainer import train

    config = conditional_config(steps=10, eval_every=5, eval_count=20)
    train(config, tmp_path / "run")
    text = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert "frechet_distance" in text[0] and "class_accuracy" in text[0]
    evaluated = [line for line in text[1:] if line.split(",")[-1]]
    assert [line.split(",")[0] for line in evaluated] == ["5", "10"]


def test_clip_features_from_a_local_model(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    evaluator = Evaluator.for_data("digits", 8, 1, features=f"clip:{tmp_path / 'clip'}")
    features = evaluator.features(torch.rand(5, 1, 8, 8) * 2 - 1)
    assert features.shape == (5, 8)
    assert evaluator.feature_space.startswith("clip:") and evaluator.floor(50) >= 0


def test_bad_feature_spaces_and_data(tmp_path, conditional_model, capsys):
    with pytest.raises(DataError, match="unknown feature space 'inception'"):
        Evaluator.for_data("digits", 8, 1, features="inception")
    from PIL import Image

    for i in range(12):
        Image.new("L", (8, 8), i * 20).save(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match="has no labels to train the evaluation classifier"):
        Evaluator.for_data(str(tmp_path), 8, 1)
    with pytest.raises(Exception, match="cannot load a CLIP model"):
        Evaluator.for_data("digits", 8, 1, features=f"clip:{tmp_path / 'nothing'}")
    code = main(["eval", "--model", str(conditional_model), "--data", f"fashion-mnist:{tmp_path}"])
    assert code == 2 and "no train-images-idx3-ubyte" in capsys.readouterr().err


def test_the_cache_goes_next_to_the_data_only_when_its_folder_is_writable(tmp_path, monkeypatch):
    from difflab.metrics.classifier import cache_dir

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "user-cache"))
    data = tmp_path / "mnist"
    data.mkdir()
    assert cache_dir(f"mnist:{data}") == data / ".difflab-cache"
    data.chmod(0o555)  # read-only, even for root (whom os.access lets write anywhere)
    try:
        assert cache_dir(f"mnist:{data}") == tmp_path / "user-cache"
    finally:
        data.chmod(0o755)
    assert cache_dir("digits") == tmp_path / "user-cache"
