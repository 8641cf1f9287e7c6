"""The main job: class-conditional training on the built-in digits, a grid per digit, evaluation."""

from __future__ import annotations

import json

from PIL import Image

from difflab.cli import main
from difflab.diffusion.samplers import DEFAULT_CFG_SCALE
from difflab.images import png_settings
from difflab.metrics import classifier
from difflab.pipelines.folder import load_model


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
