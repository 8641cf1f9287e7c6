"""The main job: class-conditional training on the built-in digits, a grid per digit, evaluation."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from difflab.cli import main
from difflab.config import TrainConfig
from difflab.images import png_settings
from difflab.models.model import DEFAULT_CFG_SCALE
from difflab.storage.folder import load_model


@pytest.mark.slow
def test_quickstart_trains_samples_and_measures(capsys, tmp_path, monkeypatch):
    from difflab.cli import quickstart

    monkeypatch.setattr(quickstart, "DIGITS_GRID", 20)  # two per digit: the grid's 80 took a fifth of the test
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
    # the estimate, measured here, comes before any training
    estimate = err.index("measured on this machine")
    assert "the UNet (3 steps), the evaluation (8 images)" in err and "should take about" in err
    assert estimate < err.index("VAE stage") and "too slow" not in err
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 8 and result["adherence"]["seen"]["n"] == 4 and result["adherence"]["held_out"]["n"] == 4
    grid = next((out / "samples").glob("step_*.png"))
    settings = png_settings(grid)
    assert settings["prompts"].split(" | ") == list(quickstart.TEXT_PROMPTS) and settings["cfg_scale"] == 7.5
    width, height = Image.open(grid).size
    assert width > height  # a column per prompt (6), a row per seed (4)
    assert load_model(out / "model").prompts is not None
    assert "| prompt adherence, held-out combinations |" in (out / "model" / "README.md").read_text()


def text_config(vae_steps: int, steps: int):
    from difflab.cli import quickstart

    config = TrainConfig()
    quickstart.text_settings(config)
    config.vae.steps, config.run.steps = vae_steps, steps
    return config


def test_quickstart_text_plan_says_the_time_and_cuts_the_steps_on_a_too_slow_machine(caplog, monkeypatch):
    from difflab.cli import quickstart

    slow = quickstart.TextSpeed(vae_step=0.3, unet_step=0.6, evaluation=60.0, reader=90.0)
    monkeypatch.setattr(quickstart, "measure_text_speed", lambda config, count: slow)
    config = text_config(1200, 1000)  # 30 + 360 + 600 + 60 + 90 s: 19 minutes, more than 12
    with caplog.at_level("INFO", logger="difflab"):
        quickstart.plan_text_run(config, 200, chosen=False, log=logging.getLogger("difflab"))
    said = caplog.text
    assert "full text quickstart would take about 19.0 minutes" in said and config.model.preset == "quick"
    assert "too slow" in said and "would take about 19.0 minutes, more than 12" in said and "--steps 800" in said
    share = (12 * 60 - 180) / 960  # what is left of 12 minutes after the fixed parts, over the training's
    assert (config.vae.steps, config.run.steps) == (round(1200 * share), round(1000 * share))
    assert f"(the VAE {config.vae.steps}, the UNet {config.run.steps}): about 12.0 minutes" in said

    crawling = quickstart.TextSpeed(vae_step=10.0, unet_step=20.0, evaluation=60.0, reader=0.0)
    monkeypatch.setattr(quickstart, "measure_text_speed", lambda config, count: crawling)
    config = text_config(1200, 1000)
    quickstart.plan_text_run(config, 200, chosen=False, log=logging.getLogger("difflab"))
    assert (config.vae.steps, config.run.steps) == (300, 250)  # never below a quarter: then it takes longer


def test_quickstart_text_plan_keeps_the_steps_on_a_fast_machine_or_when_chosen(caplog, monkeypatch):
    from difflab.cli import quickstart

    fast = quickstart.TextSpeed(vae_step=0.1, unet_step=0.2, evaluation=30.0, reader=0.0)
    monkeypatch.setattr(quickstart, "measure_text_speed", lambda config, count: fast)
    config = text_config(1200, 1000)
    with caplog.at_level("INFO", logger="difflab"):
        quickstart.plan_text_run(config, 200, chosen=False, log=logging.getLogger("difflab"))
    assert (config.model.preset, config.vae.steps, config.run.steps) == ("small", 1200, 1000)  # the full model
    assert config.optim.lr == TrainConfig().optim.lr  # at the default learning rate
    assert "should take about 6.3 minutes" in caplog.text and "too slow" not in caplog.text  # 30 + 120 + 200 + 30 s

    # the full plan over 8 minutes, the quick model within 12: the quick model's steps, as they are
    speeds = {"small": quickstart.TextSpeed(vae_step=0.3, unet_step=0.6, evaluation=30.0, reader=0.0),
              "quick": fast}
    monkeypatch.setattr(quickstart, "measure_text_speed", lambda config, count: speeds[config.model.preset])
    config = text_config(1200, 1000)
    caplog.clear()
    with caplog.at_level("INFO", logger="difflab"):
        quickstart.plan_text_run(config, 200, chosen=False, log=logging.getLogger("difflab"))
    assert (config.model.preset, config.optim.batch_size) == ("quick", 32) and "too slow" not in caplog.text
    assert (config.vae.steps, config.run.steps) == (quickstart.QUICK_PLAN["vae_steps"], quickstart.QUICK_PLAN["steps"])
    assert config.optim.lr == quickstart.QUICK_PLAN["lr"] != TrainConfig().optim.lr
    assert "full text quickstart would take about 17.0 minutes" in caplog.text  # 30 + 360 + 600 + 30 s

    slow = quickstart.TextSpeed(vae_step=1.0, unet_step=2.0, evaluation=60.0, reader=0.0)
    monkeypatch.setattr(quickstart, "measure_text_speed", lambda config, count: slow)
    config = text_config(1200, 5000)  # --steps 5000: the user's choice, said, not cut
    caplog.clear()
    with caplog.at_level("INFO", logger="difflab"):
        quickstart.plan_text_run(config, 200, chosen=True, log=logging.getLogger("difflab"))
    assert (config.model.preset, config.run.steps) == ("small", 5000) and "too slow" not in caplog.text
    assert "should take about 188.2 minutes" in caplog.text
