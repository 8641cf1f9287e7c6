"""The command line: help, outputs, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from difflab.cli import main
from difflab.data import DATA_SPEC_HELP
from difflab.images import png_settings


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_help_lists_every_command_and_the_training_settings(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("quickstart", "train", "sample", "noise"))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--min-snr-gamma" in out and "--grad-accum" in out and "[optim] settings" in out


def test_a_bad_input_is_one_line_with_status_2_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "difflab", "train", "--data", "nowhere-spec", "--out", tmp_path],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"difflab: error: unknown data spec 'nowhere-spec'; use {DATA_SPEC_HELP}"
    ]


@pytest.mark.parametrize("args,message", [
    (["train", "--model", "huge"], "unknown model preset 'huge'"),
    (["train", "--schedule", "quadratic"], "--schedule 'quadratic' is not an option"),
    (["train", "--image-size", "30", "--model", "course"], "image size 30 does not fit"),
    (["sample", "--model", "{tmp}/none"], "model folder {tmp}/none does not exist"),
    (["sample", "--model", "{tmp}", "--sampler", "fast"], "unknown sampler 'fast'; choose one of"),
    (["sample", "--model", "{tmp}", "-n", "0"], "--count must be at least 1"),
    (["noise", "--schedule", "quadratic"], "unknown noise schedule 'quadratic'"),
    (["noise", "--data", "{tmp}"], "no images in {tmp}"),
])
def test_errors_are_reported_not_raised(capsys, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] == "train":
        args += ["--out", str(tmp_path / "run"), "--steps", "1"]
    code, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("difflab: error: ") and message.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in err


def test_train_then_sample_from_the_command_line(capsys, tmp_path):
    run = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--data", "digits", "--image-size", "8", "--model", "tiny", "--steps", "6",
                        "--batch-size", "8", "--sample-count", "4", "--sample-steps", "3", "--out", run)
    assert code == 0 and f"model:    {run / 'model'}" in err
    code, err = run_cli(capsys, "train", "--out", run, "--steps", "6")
    assert code == 2 and "already holds a run" in err
    code, _ = run_cli(capsys, "train", "--out", run, "--resume", "--steps", "9")  # settings come from the run
    assert code == 0 and "steps = 9" in (run / "config.toml").read_text()

    code, err = run_cli(capsys, "sample", "--model", run, "-n", "3", "--steps", "4", "--seed", "10",
                        "--out", tmp_path / "grid.png", "--out-dir", tmp_path / "each")
    assert code == 0 and "wrote 3 images" in err
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == ["000010.png", "000011.png", "000012.png"]
    settings = png_settings(tmp_path / "each" / "000011.png")
    assert settings == {"model": str(run), "sampler": "dpm++2m", "steps": 4, "seed": 11, "width": 8, "height": 8}
    check_grid_layout(tmp_path / "grid.png", [tmp_path / "each" / f"{seed:06d}.png" for seed in (10, 11, 12)])


def check_grid_layout(grid_path, image_paths, tile=64, padding=2):
    """Three 8x8 images in a square grid: 2 columns and 2 rows of 64-px tiles (enlarged 8x) with 2 px of
    white between them; each tile is its image, the tiles differ, and the fourth cell is blank."""
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    cell = tile + padding
    assert grid.shape == (2 * cell + padding, 2 * cell + padding, 3)
    tiles = [grid[padding + r * cell:padding + r * cell + tile, padding + c * cell:padding + c * cell + tile]
             for r in range(2) for c in range(2)]
    for got, path in zip(tiles, image_paths):
        image = Image.open(path).convert("RGB").resize((tile, tile), Image.Resampling.NEAREST)
        assert np.array_equal(got, np.asarray(image)), path
    assert all(not np.array_equal(tiles[i], tiles[j]) for i, j in ((0, 1), (0, 2), (1, 2)))  # other seeds
    assert (tiles[3] == 255).all() and (grid[:, tile + padding:cell + padding] == 255).all()  # blank cell, gutter


def test_a_config_file_reruns_a_run(capsys, tmp_path):
    code, _ = run_cli(capsys, "train", "--data", "digits", "--image-size", "8", "--model", "tiny", "--steps", "3",
                      "--batch-size", "4", "--sample-count", "2", "--sample-steps", "2", "--out", tmp_path / "a")
    code, _ = run_cli(capsys, "train", "--config", tmp_path / "a" / "config.toml", "--out", tmp_path / "b")
    assert code == 0
    a = (tmp_path / "a" / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_noise_command_draws_the_schedule(capsys, tmp_path):
    code, err = run_cli(capsys, "noise", "--data", "digits", "--schedule", "cosine", "--out", tmp_path / "n.png",
                        "--images", "2", "--columns", "5")
    assert code == 0 and (tmp_path / "n.png").is_file()
    width, height = Image.open(tmp_path / "n.png").size
    assert width > 300 and height > 300



@pytest.mark.parametrize("command,resumable", [(["train"], True), (["finetune"], True), (["scratch", "train"], False)])
def test_every_training_command_finds_its_run_folder_alike(capsys, command, resumable):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert "--out OUT" in out and "--config CONFIG" in out and "delete the run already in --out" in out
    assert ("continue the run in --out from its latest checkpoint" in out) == resumable
