"""The main job: class-conditional training on the built-in digits, a grid per digit, evaluation."""

from __future__ import annotations

import json

from PIL import Image

from difflab.cli import main
from difflab.images import png_settings
from difflab.metrics import classifier
from difflab.models.model import DEFAULT_CFG_SCALE
from difflab.storage.folder import load_model


def test_quickstart_trains_samples_and_measures(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(classifier, "MIN_STEPS", 100)
    out = tmp_path / "quick"
    # 100 steps is a fraction of the 3-minute run, and already draws the digits asked for (84% on this
    # machine; 12% after 10 steps, which is chance) at a distance below the real-data floor (5.4 at n = 50,
    # floor 9.6; 50.7 after 10 steps)
    assert main(["quickstart", "--out", str(out), "--steps", "100", "-n", "50"]) == 0
    err = capsys.readouterr().err
    assert "Fréchet distance" in err and "class accuracy" in err and str(out / "model") in err
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 50 and result["class_accuracy"] >= 0.5  # chance is 0.1
    assert result["frechet_distance"] <= 2 * result["frechet_floor"]
    grid = next((out / "samples").glob("step_*.png"))
    assert png_settings(grid)["cfg_scale"] == DEFAULT_CFG_SCALE
    assert Image.open(grid).size[1] > 10 * 64  # one 64-px row per digit
    assert load_model(out / "model").class_names == [str(d) for d in range(10)]
    assert main(["quickstart", "--out", str(out), "--minutes", "0.02", "-n", "10"]) == 0  # runs again in place


def test_quickstart_text_trains_draws_its_prompts_and_measures_adherence(capsys, tmp_path, monkeypatch,
                                                                        shapes_reader):
    from difflab.cli import quickstart
    from difflab.metrics import prompt_adherence

    full_size = quickstart.text_settings

    def tiny(config):  # the command's own settings, then a model small enough for a test
        full_size(config)
        config.data.spec, config.data.image_size, config.model.preset = "shapes:n=200", 16, "tiny"
        config.optim.batch_size = config.vae.batch_size = 8
        config.vae.steps = 4

    monkeypatch.setattr(quickstart, "text_settings", tiny)
    monkeypatch.setattr(prompt_adherence, "load_or_train_attributes", lambda size: shapes_reader)
    out = tmp_path / "text"
    assert main(["quickstart", "--text", "--out", str(out), "--steps", "3", "-n", "8"]) == 0
    err = capsys.readouterr().err
    assert "prompt adherence:" in err and "held out combinations" in err and "Fréchet distance" in err
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 8 and result["adherence"]["seen"]["n"] == 4 and result["adherence"]["held_out"]["n"] == 4
    grid = next((out / "samples").glob("step_*.png"))
    settings = png_settings(grid)
    assert settings["prompts"].split(" | ") == list(quickstart.TEXT_PROMPTS) and settings["cfg_scale"] == 7.5
    width, height = Image.open(grid).size
    assert width > height  # a column per prompt (6), a row per seed (4)
    assert load_model(out / "model").prompts is not None
    assert "| prompt adherence, held-out combinations |" in (out / "model" / "README.md").read_text()
