"""The demo for text-to-image models without a browser: request checks, modes per kind of model, PNGs with
prompt and settings, the inpainting tab's mask, pixel-exact inpainting on a pixel model, the Space export."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

import tiny_sd
from difflab.app.demo import inpaint_inputs
from difflab.app.guides import Guides
from difflab.app.service import Generator, Limits, Request, check_request, modes_of
from difflab.errors import DifflabError
from difflab.images import png_settings
from difflab.storage.folder import load_model
from helpers.web import served_space

LIMITS = Limits(max_steps=10, max_images=4, max_image_size=64)
FAST = dict(sampler="ddim", steps=4, count=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {kind: tiny_sd.build(root / f"tiny-{kind}", kind) for kind in ("text", "inpaint", "depth", "upscale")}


@pytest.fixture(scope="module")
def text_model(folders):
    return load_model(folders["text"])


def picture(size=(32, 32)) -> Image.Image:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx * 255 / w, yy * 255 / h, ((xx // 8 + yy // 8) % 2) * 255], -1)
                           .astype(np.uint8))


def right_half(size=(32, 32)) -> Image.Image:
    mask = Image.new("L", size)
    mask.paste(255, (size[0] // 2, 0, size[0], size[1]))
    return mask


@pytest.mark.parametrize("change, message", [
    (dict(prompt=" "), "write a prompt: this is a text-to-image model"),
    (dict(prompt="a" * 2001), "the prompt is 2001 characters long; keep it under 2000"),
    (dict(width=17), "the image size 17×16 does not fit: the width 17 must be a multiple of 2 (the VAE's"),
    (dict(width=66, height=64), "the image size 66×64 is over this demo's limit of 64 pixels a side"),
    (dict(steps=11), "steps must be from 1 to 10"),
    (dict(mode="depth", image=picture()), "this model does text to image, image to image, inpainting, not depth"),
    (dict(mode="warp"), "unknown mode 'warp'"),
    (dict(mode="img2img"), "image to image starts from an image: upload one"),
    (dict(mode="inpaint", image=picture()), "inpainting needs a mask: paint over the region to repaint"),
    (dict(mode="inpaint", image=picture(), mask=Image.new("L", (32, 32))), "the mask is empty"),
    # the rules of every request are the GenerationRequest's (its messages name the CLI's flags)
    (dict(mode="img2img", image=picture(), strength=0), "--strength must be in (0, 1] (got 0.0)"),
    (dict(mode="img2img", image=picture(), strength=1.5), "--strength must be in (0, 1] (got 1.5)"),
    (dict(mode="img2img", image=picture(), strength="strong"), "strength must be a number (got 'strong')"),
    (dict(mode="img2img", image=picture(), strength=0.2), "strength 0.2 of 4 steps is no step at all: raise "
                                                          "--strength or --steps (at least 5 steps at this strength"),
    (dict(mode="img2img", image=picture(), steps=2, strength=0.05), "strength 0.05 of 2 steps is no step at all: "
     "raise the strength to at least 0.5 at 2 steps, or to at least 0.1 at 10 steps (the most allowed here)"),
    (dict(cfg_scale=25), "CFG scale must be a number from 0 to 20"),
    (dict(lora="mine"), "no LoRA named 'mine' here: this demo was started without LoRAs (difflab demo --model BASE "
                        "--lora RUN)"),
])
def test_bad_text_requests_get_one_line_messages(text_model, change, message):
    request = Request(**{**FAST, "prompt": "a fox", "width": 16, "height": 16, **change})
    with pytest.raises(DifflabError, match=re.escape(message)) as caught:
        check_request(request, text_model, LIMITS, Guides())
    assert "\n" not in str(caught.value)


def test_sizes_default_to_the_model_or_the_input_fitted_to_the_limit(text_model):
    checked = check_request(Request(**FAST, prompt="a fox"), text_model, LIMITS, Guides())
    assert (checked.width, checked.height, checked.cfg_scale) == (16, 16, 7.5)
    checked = check_request(Request(**FAST, prompt="a fox", mode="img2img", image=picture((200, 100))), text_model,
                            LIMITS, Guides())
    assert (checked.width, checked.height, checked.strength) == (64, 32, 0.8)  # aspect kept, under the limit


def test_text_generator_writes_pngs_with_prompt_and_a1111_parameters(text_model, tmp_path):
    generate = Generator(text_model, "tiny", LIMITS, Guides(), tmp_path)
    request = Request(**{**FAST, "count": 2}, seed=5, prompt="a fox", negative_prompt="blurry", width=24, height=16)
    first, again = generate(request), generate(request)
    assert [c for _, c in first] == [f"seed {s} · CFG 7.5 · ddim, 4 steps · 24×16" for s in (5, 6)]
    assert png_settings(first[1][0]) == {"model": "tiny", "prompt": "a fox", "negative_prompt": "blurry",
                                         "sampler": "ddim", "steps": 4, "cfg_scale": 7.5, "seed": 6, "width": 24,
                                         "height": 16}
    with Image.open(first[0][0]) as image:
        assert image.size == (24, 16)
        assert image.info["parameters"] == ("a fox\nNegative prompt: blurry\nSteps: 4, Sampler: ddim, CFG scale: 7.5, "
                                            "Seed: 5, Size: 24x16, Model: tiny")
    pixels = [[np.asarray(Image.open(path)) for path, _ in r] for r in (first, again)]
    assert all(np.array_equal(a, b) for a, b in zip(*pixels))  # same seed, same image
    assert not np.array_equal(pixels[0][0], pixels[0][1])
    img2img = generate(Request(**FAST, seed=5, prompt="a fox", mode="img2img", image=picture(), strength=0.5))
    assert img2img[0][1] == "seed 5 · CFG 7.5 · ddim, 4 steps · 32×32 · image to image, strength 0.5"
    assert png_settings(img2img[0][0])["mode"] == "img2img"


def test_each_kind_of_model_gets_its_own_modes_and_tabs(folders, tmp_path):
    from difflab.app import build_demo

    expected = {"text": ("txt2img", "img2img", "inpaint"), "inpaint": ("inpaint",), "depth": ("depth",),
                "upscale": ("upscale",)}
    for kind, folder in folders.items():
        model = load_model(folder)
        assert modes_of(model) == expected[kind]
        demo = build_demo(folder, limits=LIMITS)
        endpoints = {f.api_name for f in demo.fns.values() if f.api_visibility == "public"}
        assert endpoints == set(expected[kind])
        generate = Generator(model, kind, LIMITS, Guides(), tmp_path / kind)
        small = picture((8, 8)) if kind == "upscale" else picture((16, 16))
        mode = expected[kind][-1] if kind != "text" else "txt2img"
        request = Request(**FAST, seed=1, prompt="a fox", mode=mode, image=None if mode == "txt2img" else small,
                          mask=right_half((16, 16)) if mode == "inpaint" else None)
        ((path, caption),) = generate(request)
        with Image.open(path) as image:
            assert image.size == ((32, 32) if kind == "upscale" else (16, 16)), kind
        if kind == "upscale":
            assert caption.endswith("upscaling, noise level 20")
            with pytest.raises(DifflabError, match="the upscaler makes images 4× its input: 32×32 would give "
                                                   "128×128, over this demo's limit of 64"):
                generate(Request(**FAST, prompt="a fox", mode="upscale", image=picture()))
        if kind != "text":
            with pytest.raises(DifflabError, match=f"a {model.kind.pipeline} model does"):
                generate(Request(**FAST, prompt="a fox"))


def test_inpainting_tab_mask_from_the_editor_and_an_upload():
    image = picture().convert("RGBA")
    strokes = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    strokes.paste((255, 255, 255, 255), (20, 0, 32, 32))
    found, mask = inpaint_inputs({"background": image, "layers": [strokes], "composite": None}, None)
    assert found.mode == "RGB" and np.array_equal(np.asarray(found), np.asarray(picture()))
    assert np.array_equal(np.asarray(mask) > 0, np.asarray(strokes)[..., 3] > 0)
    uploaded = Image.new("L", (64, 64))
    uploaded.paste(255, (0, 0, 8, 64))  # the left eighth, at twice the size
    _, both = inpaint_inputs({"background": image, "layers": [strokes], "composite": None}, uploaded)
    columns = (np.asarray(both) > 0).all(axis=0)
    assert columns[:4].all() and not columns[4:20].any() and columns[20:].all()
    _, only_upload = inpaint_inputs({"background": image, "layers": [], "composite": None}, uploaded)
    assert only_upload.size == (64, 64)  # generate resizes a mask of the image's shape
    assert inpaint_inputs(None, None) == (None, None)


def test_inpainting_a_pixel_model_keeps_the_unmasked_region_exactly(trained_model, tmp_path):
    """In pixel space nothing stands between the sampler and the image: the kept region comes back as it was
    (to the PNG's rounding) and the repainted region changes. (The browser test measures a latent model.)"""
    model = load_model(trained_model)
    generate = Generator(model, "tiny", LIMITS, Guides(), tmp_path)
    source = Image.fromarray(((np.add.outer(np.arange(8), np.arange(8)) % 2) * 255).astype(np.uint8))
    mask = right_half((8, 8))
    ((path, caption),) = generate(Request(**FAST, seed=3, mode="inpaint", image=source, mask=mask))
    out, source = np.asarray(Image.open(path), dtype=float), np.asarray(source, dtype=float)
    kept, repainted = np.abs(out - source)[:, :4], np.abs(out - source)[:, 4:]
    print(f"pixel inpainting: kept region max |difference| {kept.max():.1f}, repainted mean {repainted.mean():.1f}")
    assert kept.max() <= 1 and repainted.mean() > 20
    assert caption == "seed 3 · ddim, 4 steps · 8×8 · inpainting, strength 1"


@pytest.mark.slow
def test_export_of_a_text_model_is_a_space_that_runs(folders, tmp_path):
    from difflab.cli import main

    space = tmp_path / "space"
    assert main(["-q", "demo", "--model", str(folders["text"]), "--export", str(space), "--max-steps", "12",
                 "--max-image-size", "64"]) == 0
    assert {p.name for p in space.iterdir()} == {"app.py", "requirements.txt", "README.md", "model", "difflab"}
    readme = (space / "README.md").read_text()
    assert readme.startswith("---\n") and "sdk: gradio\n" in readme and "app_file: app.py" in readme
    assert 'StableDiffusionPipeline.from_pretrained("model")' in readme and "text-to-image" in readme
    assert "transformers==" in (space / "requirements.txt").read_text()
    assert "max_image_size=64" in (space / "app.py").read_text()
    assert (space / "model" / "text_encoder" / "model.safetensors").is_file()

    with served_space(space, tmp_path) as client:
        gallery, _ = client.predict("a fox", "", "ddim", 2, 3, 1, 16, 16, 7.5, "#ff0000", 0, 0, api_name="/txt2img")
    assert gallery[0]["caption"] == "seed 3 · CFG 7.5 · ddim, 2 steps · 16×16"


def test_export_names_a_hub_model_instead_of_copying_it(folders, tmp_path, monkeypatch):
    """A model given by its Hub id stays on the Hub: app.py names it and the Space downloads it."""
    from difflab.app import export

    monkeypatch.setattr(export, "resolve_model_folder", lambda spec, allow_pickle: folders["text"])
    space = export.export_space("someone/tiny-sd", tmp_path / "space", limits=LIMITS)
    assert {p.name for p in space.iterdir()} == {"app.py", "requirements.txt", "README.md", "difflab"}
    assert "build_demo('someone/tiny-sd', limits=limits" in (space / "app.py").read_text()
    readme = (space / "README.md").read_text()
    assert "models:\n  - someone/tiny-sd\n---" in readme
    assert "[someone/tiny-sd](https://huggingface.co/someone/tiny-sd)" in readme
