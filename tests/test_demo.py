"""The demo without a browser: request checks, limits, PNG metadata, the Gradio app, the Space export."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.app.guides import Guides, hex_color
from difflab.app.service import Generator, Limits, Request, check_model, check_request
from difflab.errors import ConfigError, DifflabError, ModelError
from difflab.images import png_settings
from difflab.models.model import DEFAULT_CFG_SCALE
from difflab.storage.folder import load_model
from helpers.web import served_space, space_environment

FAST = dict(sampler="ddim", steps=3, count=2)


@pytest.fixture(scope="module")
def conditional(conditional_model):
    return load_model(conditional_model)


@pytest.fixture(scope="module")
def unconditional(trained_model):
    return load_model(trained_model)



@pytest.mark.parametrize("change, message", [
    (dict(steps=11), "steps must be from 1 to 10"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(count=5), "number of images must be from 1 to 4"),
    (dict(count=0), "number of images must be from 1 to 4"),
    (dict(seed=-1), "seed must be from 0"),
    (dict(seed="abc"), "seed must be a whole number"),
    (dict(sampler="fast"), "unknown sampler 'fast'"),
    (dict(cfg_scale=math.nan), "CFG scale must be a number from 0 to 20"),
    (dict(cfg_scale=-1), "CFG scale must be a number from 0 to 20"),
    (dict(class_name="11"), "class '11' does not exist"),
    (dict(class_name="1,2"), "choose one class per request"),
    (dict(class_name=None), "choose a class"),
    (dict(color_scale=1e6), "colour guidance scale must be a number from 0 to 400"),
    (dict(color_scale=80, color="#12345"), "cannot read the colour '#12345'"),
    (dict(color_scale=80, color="rgb(300, 0, 0)"), "is not a colour"),
    (dict(clip_scale=8, prompt="a red rose"), "CLIP guidance needs a CLIP model: start the demo with --clip-model"),
])
def test_bad_requests_get_one_line_messages(conditional, change, message):
    request = Request(**{**FAST, "class_name": "3", **change})
    with pytest.raises(DifflabError, match=message) as caught:
        check_request(request, conditional, Limits(max_steps=10, max_images=4), Guides())
    assert "\n" not in str(caught.value)


def test_good_requests_are_normalised(conditional, unconditional):
    checked = check_request(Request(**FAST, seed="7", class_name=" 3 ", cfg_scale="1.5"), conditional, Limits(),
                            Guides())
    assert (checked.seed, checked.class_name, checked.cfg_scale) == (7, "3", 1.5)
    with pytest.raises(ConfigError, match="unconditional"):
        check_request(Request(**FAST, class_name="3"), unconditional, Limits(), Guides())
    assert check_request(Request(**FAST), unconditional, Limits(), Guides()).class_name is None


def test_limits_and_image_size_cap(conditional):
    with pytest.raises(ConfigError, match="max-steps must be a whole number, at least 1"):
        Limits(max_steps=0)
    with pytest.raises(ModelError, match="makes 8x8 images, larger than this demo's limit of 4"):
        check_model(conditional, Limits(max_image_size=4), "tiny")
    check_model(conditional, Limits(max_image_size=8), "tiny")


def test_colour_values_from_a_picker():
    assert hex_color("#5FA") == "#55ffaa"
    assert hex_color("rgba(85, 255, 170, 1)") == "#55ffaa"
    assert hex_color("#55FFAA") == "#55ffaa"
    assert hex_color("red") == "#ff0000"
    with pytest.raises(DifflabError, match="cannot read the colour"):
        hex_color("red; drop table")


def test_generator_writes_pngs_with_their_settings(conditional, tmp_path):
    generate = Generator(conditional, "tiny", Limits(), Guides(), tmp_path)
    first = generate(Request(**FAST, seed=5, class_name="4", cfg_scale=2.0))
    again = generate(Request(**FAST, seed=5, class_name="4", cfg_scale=2.0))
    assert [c for _, c in first] == [f"seed {s} · class 4 (CFG 2) · ddim, 3 steps" for s in (5, 6)]
    assert png_settings(first[1][0]) == {"model": "tiny", "sampler": "ddim", "steps": 3, "seed": 6, "class": "4",
                                         "cfg_scale": 2.0}
    pixels = [[torch.tensor(list(Image.open(path).getdata())) for path, _ in r] for r in (first, again)]
    assert all(torch.equal(a, b) for a, b in zip(*pixels))  # same seed, same image
    assert not torch.equal(pixels[0][0], pixels[0][1])
    assert first[0][0].parent != again[0][0].parent


def test_colour_and_clip_guidance(conditional, tiny_clip, tmp_path):
    generate = Generator(conditional, "tiny", Limits(), Guides(str(tiny_clip)), tmp_path)
    plain = generate(Request(**FAST, seed=3, class_name="1"))
    white = generate(Request(**FAST, seed=3, class_name="1", color="rgba(255, 255, 255, 1)", color_scale=200))
    assert png_settings(white[0][0]) == {"model": "tiny", "sampler": "ddim", "steps": 3, "seed": 3, "class": "1",
                                         "cfg_scale": DEFAULT_CFG_SCALE, "color": "#ffffff", "color_scale": 200.0}
    assert white[0][1].endswith("colour #ffffff ×200")
    brightness = [np.asarray(Image.open(r[0][0]), dtype=float).mean() for r in (plain, white)]
    assert brightness[1] > brightness[0] + 10  # pulled towards white
    rose = generate(Request(**FAST, seed=3, class_name="1", prompt="a red rose", clip_scale=8))
    assert png_settings(rose[0][0])["prompt"] == "a red rose" and "CLIP 'a red rose' ×8" in rose[0][1]
    with pytest.raises(ConfigError, match="CLIP guidance needs a prompt"):
        generate(Request(**FAST, seed=3, class_name="1", prompt=" ", clip_scale=8))


def test_old_request_folders_are_pruned(unconditional, tmp_path, monkeypatch):
    monkeypatch.setattr("difflab.app.service.KEEP_REQUESTS", 2)
    generate = Generator(unconditional, "tiny", Limits(), Guides(), tmp_path)
    for seed in range(4):
        generate(Request(sampler="ddim", steps=1, count=1, seed=seed))
        time.sleep(0.01)
    assert len(list(tmp_path.glob("request-*"))) == 2


def test_app_turns_bad_input_into_a_page_message(conditional_model):
    import gradio as gr

    from difflab.app import build_demo

    demo = build_demo(conditional_model, limits=Limits(max_steps=10, max_images=4))
    assert demo.config["title"].startswith("difflab")
    (handler,) = [f.fn for f in demo.fns.values() if f.api_name == "generate"]
    with pytest.raises(gr.Error, match="steps must be from 1 to 10"):
        handler("ddim", 50, 0, 1, "3", 2.0, "#ff0000", 0, "", 0)
    gallery, files = handler("ddim", 2, 9, 2, "3", 2.0, "#ff0000", 0, "", 0)
    assert [c for _, c in gallery][0].startswith("seed 9 · class 3")
    assert png_settings(files[1])["seed"] == 10


@pytest.mark.slow
def test_export_is_a_space_that_runs(conditional_model, tmp_path):
    from difflab.cli import main

    space = tmp_path / "space"
    assert main(["-q", "demo", "--model", str(conditional_model), "--export", str(space), "--max-steps", "12"]) == 0
    assert {p.name for p in space.iterdir()} == {"app.py", "requirements.txt", "README.md", "model", "difflab"}
    readme = (space / "README.md").read_text()
    assert readme.startswith("---\n") and "sdk: gradio\n" in readme and "app_file: app.py" in readme
    requirements = (space / "requirements.txt").read_text()
    assert "diffusers==" in requirements and "torch==" in requirements and "gradio" not in requirements
    assert "max_steps=12" in (space / "app.py").read_text()
    assert (space / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # A second export replaces the first; a folder that is not an export is refused.
    assert main(["-q", "demo", "--model", str(conditional_model), "--export", str(space)]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["-q", "demo", "--model", str(conditional_model), "--export", str(tmp_path / "other")]) == 2

    found = subprocess.run([sys.executable, "-c", "import difflab; print(difflab.__file__)"], cwd=space,
                           env=space_environment(),
                           capture_output=True, text=True, check=True).stdout
    assert found.strip() == str(space / "difflab" / "__init__.py")  # the vendored copy, not an installed one

    with served_space(space, tmp_path) as client:
        gallery, _ = client.predict("ddim", 2, 3, 1, "5", 2.0, "#ff0000", 0, "", 0, api_name="/generate")
    assert gallery[0]["caption"] == "seed 3 · class 5 (CFG 2) · ddim, 2 steps"
