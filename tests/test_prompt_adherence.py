"""difflab eval on text-to-image models: prompt adherence on shapes, seen and held-out combinations."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import tiny_sd
from difflab.cli import main
from difflab.data import shapes
from difflab.metrics.attributes import adherence
from difflab.metrics.prompt_adherence import evaluate_prompts, evaluation_prompts, real_images, reconstruction_adherence
from difflab.storage.folder import load_model


@pytest.fixture(scope="module")
def shapes_text_model(tmp_path_factory):
    """A tiny random text model that says it was trained on shapes (16x16)."""
    folder = tiny_sd.build(tmp_path_factory.mktemp("t2i") / "model", "text")
    (folder / "difflab.json").write_text(json.dumps({"image_size": 16, "channels": 3, "data": "shapes"}))
    return folder


def test_half_the_prompts_hold_combinations_training_never_saw():
    prompts = evaluation_prompts(10, seed=3)
    assert [p.held_out for p in prompts] == [False] * 5 + [True] * 5
    assert evaluation_prompts(10, seed=3) == prompts and evaluation_prompts(10, seed=4) != prompts


def test_a_random_model_follows_no_prompt(shapes_text_model, shapes_reader):
    result = evaluate_prompts(load_model(shapes_text_model), 16, sampler="ddim", steps=3, cfg_scale=7.5,
                              reader=shapes_reader)
    shares = result["adherence"]
    assert shares["seen"]["n"] == 8 and shares["held_out"]["n"] == 8
    assert shares["colour"] < 0.6  # six colours: a model that ignores its prompt is near chance
    assert result["frechet_distance"] > 0 and result["feature_space"] == "attribute reader"  # n=16: only a smoke
    assert shares["classifier_test_accuracy"]["colour"] > 0.9  # the yardstick itself reads drawn shapes
    assert set(result["vae_ceiling"]) == {"colour", "shape", "position", "all"}


def test_the_vae_ceiling_is_what_the_reader_sees_in_the_vaes_reconstructions(shapes_text_model, shapes_reader):
    model = load_model(shapes_text_model)
    random_vae = reconstruction_adherence(model, 24, 0, shapes_reader)

    class LosesNothing:
        encode = decode = staticmethod(lambda x: x)

    model.codec = LosesNothing()
    perfect = reconstruction_adherence(model, 24, 0, shapes_reader)
    assert perfect["colour"] > 0.9 and perfect["position"] > 0.9
    assert random_vae["colour"] < 0.6  # an untrained VAE keeps no colour


def test_real_drawn_images_score_at_the_reader_accuracy(shapes_reader):
    """The other end of the scale: images drawn exactly as prompted, held-out combinations included."""
    prompts = evaluation_prompts(40, seed=0)
    drawn = [shapes.render(p, 16, np.random.default_rng(i)) for i, p in enumerate(prompts)]
    images = torch.stack([torch.from_numpy(d).permute(2, 0, 1) for d in drawn]).float() / 127.5 - 1
    assert adherence(images, prompts, shapes_reader)["colour"] > 0.9
    assert real_images(4, 16, 0).shape == (4, 3, 16, 16)


def test_eval_of_a_text_model_on_other_data_says_what_it_measures(shapes_text_model, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(shapes_text_model, other)
    (other / "difflab.json").write_text(json.dumps({"image_size": 16, "channels": 3, "data": "digits"}))
    assert main(["eval", "--model", str(other), "-n", "4", "--steps", "2"]) == 2
    # digits hold no captions: a text model trained on them is measured on captioned data it is given
    assert re.search(r"digits have no captions to prompt a text model with; give --data captioned images",
                     capsys.readouterr().err)
