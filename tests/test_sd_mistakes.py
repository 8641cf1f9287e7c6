"""Mistakes with Stable Diffusion models and image inputs: one line each, exit status 2, no file
written; and the prompt longer than the tokenizer takes, which now reaches the UNet whole (docs/prompts.md)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from difflab.cli import main


@pytest.fixture(scope="module")
def models(tiny_sd_folders):
    return {kind: tiny_sd_folders(kind) for kind in ("text", "upscale")}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "photo.png")
    Image.fromarray(np.full((32, 32), 255, dtype=np.uint8)).save(root / "mask-32.png")  # same shape, larger
    Image.fromarray(np.full((16, 24), 255, dtype=np.uint8)).save(root / "mask-wide.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def one_error(capsys, argv, tmp_path) -> str:
    out = tmp_path / "out.png"
    code = main(["sample", *argv, "--steps", "2", "-n", "1", "--out", str(out)])
    err = capsys.readouterr().err
    lines = re.findall(r"difflab: error: [^\r\n]*", err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["--class", "3"], "text-to-image model: it takes a prompt .*not a class"),
    ([], "text-to-image model: give a prompt"),
    (["--prompt", "a", "--width", "15"], "width 15 must be a multiple of 2 .*nearest that work: 14 or 16"),
    (["--prompt", "a", "--height", "0"], r"--height must be a positive number of pixels \(got 0\)"),
    (["--prompt", "a", "--image", "{photo}", "--strength", "0"], r"--strength must be in \(0, 1\]"),
    (["--prompt", "a", "--image", "{photo}", "--strength", "1.5"], r"--strength must be in \(0, 1\]"),
    (["--prompt", "a", "--image", "{photo}", "--strength", "nan"], r"--strength must be in \(0, 1\]"),
    (["--prompt", "a", "--image", "{photo}", "--strength", "0.2"], "strength 0.2 of 2 steps is no step at all"),
    (["--prompt", "a", "--strength", "0.5"], "--strength is how much of --image is repainted .*: it needs an image"),
    (["--prompt", "a", "--mask", "{mask-32}"], "a mask needs the image it belongs to: give --image"),
    (["--prompt", "a", "--image", "{photo}", "--mask", "{mask-wide}"], "mask is 24×16 but the image is 16×16"),
    (["--prompt", "a", "--image", "{broken}"], "cannot read the image .*broken.png"),
    (["--prompt", "a", "--image", "{photo}", "--depth", "{photo}"], "a depth map is for depth-to-image models"),
    (["--prompt", "a", "--noise-level", "5"], "--noise-level is for the ×4 upscaler"),
])
def test_text_model_mistakes(capsys, tmp_path, models, pictures, argv, message):
    argv = [a.format(**{p.stem: p for p in pictures.iterdir()}) for a in argv]
    assert re.search(message, one_error(capsys, ["--model", str(models["text"]), *argv], tmp_path))


def test_upscaler_mistakes(capsys, tmp_path, models, pictures):
    model = ["--model", str(models["upscale"]), "--prompt", "a"]
    assert "--noise-level 101 is outside what this upscaler takes: 0 to 100" in one_error(
        capsys, [*model, "--image", str(pictures / "photo.png"), "--noise-level", "101"], tmp_path)
    assert "needs an input image (--image)" in one_error(capsys, model, tmp_path)


def test_a_prompt_on_a_model_without_a_text_encoder(capsys, tmp_path, trained_model):
    assert "has no text encoder, so it takes no prompt" in one_error(
        capsys, ["--model", str(trained_model), "--prompt", "a cat"], tmp_path)


def test_a_unet_whose_channels_fit_no_layout(capsys, tmp_path, models):
    folder = shutil.copytree(models["text"], tmp_path / "odd")
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["in_channels"] = 6
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    message = one_error(capsys, ["--model", str(folder), "--prompt", "a"], tmp_path)
    assert "its UNet takes 6 input channels, which match no known layout" in message
    assert "inpaint: 9" in message and "depth: 5" in message


def test_a_mask_of_the_same_shape_is_resized_with_a_notice(capsys, tmp_path, models, pictures):
    code = main(["sample", "--model", str(models["text"]), "--prompt", "a", "--image", str(pictures / "photo.png"),
                 "--mask", str(pictures / "mask-32.png"), "--steps", "2", "-n", "1", "--out", str(tmp_path / "o.png")])
    assert code == 0 and "the mask is 32×32 and the image 16×16: the mask is resized" in capsys.readouterr().err


def test_a_prompt_longer_than_the_tokenizer_takes_reaches_the_unet_whole_without_a_warning(capsys, tmp_path, models):
    prompt = "a small red circle at the top left on a white background"  # 51 tokens here, the limit is 24
    code = main(["sample", "--model", str(models["text"]), "--prompt", prompt, "--steps", "2", "-n", "1",
                 "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 0 and (tmp_path / "o.png").is_file()
    assert "dropped" not in err and "longer than" not in err  # cut only for a UNet that takes one chunk: test_prompts


def test_a_damaged_component_is_named(capsys, tmp_path, models):
    import torch
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(models["text"], tmp_path / "damaged")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, weights)
    message = one_error(capsys, ["--model", str(folder), "--prompt", "a"], tmp_path)
    assert "vae" in message and ("damaged" in message or "not a number" in message), message
