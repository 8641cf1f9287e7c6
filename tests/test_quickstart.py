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
    assert main(["quickstart", "--out", str(out), "--minutes", "0.05", "-n", "20"]) == 0
    err = capsys.readouterr().err
    assert "Fréchet distance" in err and "class accuracy" in err and str(out / "model") in err
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 20 and 0 <= result["class_accuracy"] <= 1 and result["frechet_floor"] > 0
    grid = next((out / "samples").glob("step_*.png"))
    assert png_settings(grid)["cfg_scale"] == DEFAULT_CFG_SCALE
    assert Image.open(grid).size[1] > 10 * 64  # one 64-px row per digit
    assert load_model(out / "model").class_names == [str(d) for d in range(10)]
    assert main(["quickstart", "--out", str(out), "--minutes", "0.02", "-n", "10"]) == 0  # runs again in place
