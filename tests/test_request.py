"""The generation request (diffusion/request.py): every rule in `check(model)`, each mistake one line
before any work; `settings(model)` says what the request was, and a PNG written by `difflab sample`
carries it (difflab's JSON and A1111's `parameters`)."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.config import ModelConfig
from difflab.diffusion.generate import generate
from difflab.diffusion.request import (
    DEFAULT_INPAINT_STRENGTH,
    DEFAULT_NOISE_LEVEL,
    DEFAULT_STRENGTH,
    GenerationRequest,
)
from difflab.diffusion.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS
from difflab.errors import DifflabError
from difflab.images import a1111_text, png_settings
from difflab.models.build import build_model
from difflab.storage.folder import load_model


@pytest.fixture(scope="module")
def pixel():
    return build_model(ModelConfig(preset="tiny"), 8, 1, "none", seed=0)


@pytest.fixture(scope="module")
def classes():
    return build_model(ModelConfig(preset="tiny", conditioning="class"), 8, 1, "none", seed=0,
                       class_names=["zero", "one", "two"])


@pytest.fixture(scope="module")
def folders(tiny_sd_folders):
    return {kind: tiny_sd_folders(kind) for kind in ("text", "upscale")}


@pytest.fixture(scope="module")
def text(folders):
    return load_model(folders["text"])


PHOTO = Image.new("RGB", (16, 16), "red")


@pytest.mark.parametrize("model, fields, message", [
    ("pixel", dict(count=0), "the number of images must be a whole number, at least 1 (got 0)"),
    ("pixel", dict(seed=-1), "--seed must be a whole number from 0 to"),
    ("pixel", dict(sampler="fast"), "unknown sampler 'fast'"),
    ("pixel", dict(steps=0), "--steps must be at least 1 (got 0)"),
    ("pixel", dict(steps=5000), "--steps 5000 is more than dpm++2m can take"),
    ("pixel", dict(eta=-1.0), "--eta must be 0 or more (got -1.0)"),
    ("pixel", dict(cfg_scale=math.inf), "--cfg-scale must be a finite number (got inf)"),
    ("pixel", dict(precision="fp8"), "unknown precision 'fp8'"),
    ("pixel", dict(guidance_mode="slow"), "unknown guidance mode 'slow'"),
    ("pixel", dict(prompts="a fox"), "this model has no text encoder, so it takes no prompt"),
    ("classes", dict(prompts="a fox"), "takes no prompt; give --class instead"),
    ("classes", dict(count=2, class_labels=[1]), "1 class labels for 2 images: give one per image"),
    ("pixel", dict(blend=["a leopard:0.5"]), "a blend mixes prompts: it needs a text-to-image model"),
    ("pixel", dict(image=PHOTO, strength=1.5), "--strength must be in (0, 1] (got 1.5)"),
    ("pixel", dict(image=PHOTO, strength=0.0), "--strength must be in (0, 1] (got 0.0)"),
    ("pixel", dict(strength=0.5), "--strength is how much of --image is repainted (1: everything): it needs an image"),
    ("pixel", dict(mask=PHOTO), "a mask needs the image it belongs to: give --image too"),
    ("pixel", dict(image=PHOTO, depth=PHOTO), "a depth map is for depth-to-image models"),
    ("pixel", dict(noise_level=20), "--noise-level is for the ×4 upscaler"),
    ("pixel", dict(width=0), "--width must be a positive number of pixels (got 0)"),
    ("pixel", dict(width=9), "the image size 9×8 does not fit: the width 9 must be a multiple of 2 (the factor the "
                             "UNet's levels halve by); nearest that work: 8 or 10"),
    ("pixel", dict(image=PHOTO, steps=4, strength=0.2), "strength 0.2 of 4 steps is no step at all: raise --strength "
                                                        "or --steps (at least 5 steps at this strength, or a strength "
                                                        "of at least 0.25 at 4 steps)"),
    ("text", dict(), "this is a text-to-image model: give a prompt"),
    ("text", dict(prompts="a fox", class_labels=[0]), "this is a text-to-image model: it takes a prompt (--prompt), "
                                                      "not a class"),
    ("text", dict(prompts="a fox", width=17), "the image size 17×16 does not fit: the width 17 must be a multiple "
                                              "of 2 (the VAE's downscaling factor)"),
    ("text", dict(count=3, prompts=["a", "b"]), "2 prompts for 3 images: give one, or one per image"),
    ("text", dict(prompts="a fox", prompt_embeds=torch.zeros(1, 4, 32)), "give prompts or prompt embeddings, not both"),
    ("text", dict(negative_prompt_embeds=torch.zeros(1, 4, 32), prompts="a"), "negative prompt embeddings need prompt "
                                                                              "embeddings"),
    ("text", dict(prompt_embeds=torch.zeros(1, 4, 5)), "prompt_embeds has shape [1, 4, 5]: this model takes"),
    ("upscale", dict(prompts="a fox"), "this is a StableDiffusionUpscalePipeline model: it needs an input image"),
    ("upscale", dict(prompts="a fox", image=PHOTO, noise_level=5000), "--noise-level 5000 is outside what this "
                                                                      "upscaler takes: 0 to"),
    ("upscale", dict(prompts="a fox", image=PHOTO, width=64), "the upscaler's output size is its input's × 4"),
    ("upscale", dict(prompts="a fox", image=PHOTO, mask=PHOTO), "model does not inpaint; give no --mask"),
])
def test_each_bad_request_is_refused_in_one_line_before_any_work(request, folders, model, fields, message):
    model = load_model(folders["upscale"]) if model == "upscale" else request.getfixturevalue(model)
    with pytest.raises(DifflabError, match=re.escape(message)) as caught:
        GenerationRequest(**fields).check(model)
    assert "\n" not in str(caught.value)


def test_generate_takes_a_request_and_checks_it(pixel):
    with pytest.raises(DifflabError, match="generate\\(model, request\\) takes a GenerationRequest, not int"):
        generate(pixel, 4)
    with pytest.raises(DifflabError, match="--strength must be in"):
        generate(pixel, GenerationRequest(1, image=PHOTO, strength=2.0))


def test_defaults_are_the_requests_own(pixel, classes, text, folders):
    request = GenerationRequest()
    assert (request.count, request.sampler, request.steps, request.seed) == (1, DEFAULT_SAMPLER, DEFAULT_STEPS, 0)
    assert GenerationRequest(image=PHOTO).run_strength(pixel) == DEFAULT_STRENGTH
    assert GenerationRequest(image=PHOTO, mask=PHOTO).run_strength(pixel) == DEFAULT_INPAINT_STRENGTH
    assert GenerationRequest(image=PHOTO, strength=0.3).run_strength(pixel) == 0.3
    assert GenerationRequest().run_strength(pixel) is None and GenerationRequest().run_noise_level(pixel) is None
    assert GenerationRequest(image=PHOTO).run_noise_level(load_model(folders["upscale"])) == DEFAULT_NOISE_LEVEL
    assert GenerationRequest().run_guidance(text).scale == text.default_cfg_scale
    assert GenerationRequest().run_guidance(classes).scale == classes.default_cfg_scale != text.default_cfg_scale
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.steps = 3  # a request is a value: dataclasses.replace makes another


def test_settings_describe_the_request(classes, text):
    request = GenerationRequest(4, sampler="ddim", steps=3, seed=7, class_labels=[2, 2, 1, 1], cfg_scale=2.0)
    assert request.settings(classes) == {"sampler": "ddim", "steps": 3, "seed": 7, "count": 4, "cfg_scale": 2.0}
    assert request.settings(classes, image=3) == {"sampler": "ddim", "steps": 3, "seed": 10, "class": "one",
                                                  "cfg_scale": 2.0}
    request = GenerationRequest(2, prompts=["a fox", "a cat"], negative_prompt="blurry", image="in.png", width=16,
                                height=24)
    assert request.settings(text) == {"sampler": DEFAULT_SAMPLER, "steps": DEFAULT_STEPS, "seed": 0, "count": 2,
                                      "prompts": "a fox | a cat", "negative_prompt": "blurry",
                                      "cfg_scale": text.default_cfg_scale, "mode": "img2img",
                                      "strength": DEFAULT_STRENGTH, "image": "in.png", "width": 16, "height": 24}
    assert request.settings(text, image=1, size=(8, 8))["prompt"] == "a cat"


def test_a_sampled_png_carries_what_the_request_said(folders, tmp_path):
    out = tmp_path / "grid.png"
    photo = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), "blue").save(photo)
    assert main(["-q", "sample", "--model", str(folders["text"]), "-n", "2", "--steps", "4", "--sampler", "ddim",
                 "--seed", "5", "--prompt", "a (red:1.2) fox", "--negative-prompt", "blurry", "--cfg-scale", "3",
                 "--image", str(photo), "--strength", "0.5", "--precision", "no", "--out", str(out),
                 "--out-dir", str(tmp_path / "each")]) == 0
    said = GenerationRequest(2, sampler="ddim", steps=4, seed=5, prompts="a (red:1.2) fox", negative_prompt="blurry",
                             cfg_scale=3.0, image=str(photo), strength=0.5, precision="no")
    text = load_model(folders["text"])
    assert png_settings(out) == {"model": str(folders["text"]), **said.settings(text, size=(16, 16))}
    each = png_settings(tmp_path / "each" / "000006.png")
    assert each == {"model": str(folders["text"]), **said.settings(text, image=1, size=(16, 16))}
    assert each["seed"] == 6 and each["strength"] == 0.5 and each["mode"] == "img2img"
    assert a1111_text(out) == ("a (red:1.2) fox\nNegative prompt: blurry\nSteps: 4, Sampler: ddim, CFG scale: 3.0, "
                               f"Seed: 5, Size: 16x16, Denoising strength: 0.5, Model: {folders['text']}")


def test_the_no_step_advice_stays_within_the_callers_most_steps(pixel):
    request = GenerationRequest(image=PHOTO, steps=2, strength=0.05)
    with pytest.raises(DifflabError, match=re.escape("at least 20 steps at this strength")):
        request.check(pixel)
    with pytest.raises(DifflabError, match=re.escape("raise the strength to at least 0.5 at 2 steps, or to at least "
                                                     "0.1 at 10 steps (the most allowed here)")):
        request.check(pixel, most_steps=10)  # the demo's limit
