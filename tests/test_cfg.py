"""Classifier-free guidance in a limited interval of noise levels and guidance rescale (diffusion/cfg.py):
equal to diffusers' `guidance_rescale`, the interval's two ends, the model folder's default, the CLI's
flags, errors and PNG settings."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_sd
from difflab.cli import main
from difflab.diffusion.cfg import ClassifierFreeGuidance, guidance_of, noise_levels, parse_interval
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.diffusion.samplers import scheduler_for
from difflab.errors import DifflabError, InputError
from difflab.images import png_settings
from difflab.storage.folder import load_model

PROMPTS = ["a red circle", "a blue square on black"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("cfg-sd") / "text", "text")


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_rescale_equals_diffusers_guidance_rescale(sd_folder, sampler):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.scheduler = scheduler_for(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(3 + i) for i in range(len(PROMPTS))]
    theirs = pipe(prompt=PROMPTS, negative_prompt=["green"] * 2, guidance_scale=7.5, guidance_rescale=0.7,
                  generator=generators, num_inference_steps=6, height=16, width=24, output_type="np").images
    model = load_model(sd_folder)
    request = GenerationRequest(2, sampler=sampler, steps=6, seed=3, prompts=PROMPTS, negative_prompt="green",
                                cfg_scale=7.5, height=16, width=24)
    ours = generate(model, replace(request, cfg_rescale=0.7)).permute(0, 2, 3, 1).numpy()
    plain = generate(model, request).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.abs(ours - plain).max() > 1e-3  # the rescale changed the images
    assert theirs.std() > 0.01


def images(model_dir, **options):
    model = load_model(model_dir)
    labels = torch.tensor([0, 3, 5, 7])
    return generate(model, GenerationRequest(4, sampler="ddim", steps=8, seed=1, class_labels=labels, **options))


def test_interval_everywhere_is_plain_cfg_exactly(conditional_model):
    plain = images(conditional_model, cfg_scale=3.0)
    assert torch.equal(images(conditional_model, cfg_scale=3.0, cfg_interval=(0, math.inf)), plain)
    assert torch.equal(images(conditional_model, cfg_scale=3.0, cfg_interval="0-inf", cfg_rescale=0), plain)


def test_an_interval_no_step_reaches_is_plain_conditional_sampling(conditional_model):
    unguided = images(conditional_model, cfg_scale=1.0)
    assert torch.equal(images(conditional_model, cfg_scale=3.0, cfg_interval=(1e6, 1e7)), unguided)
    part = images(conditional_model, cfg_scale=3.0, cfg_interval=(0.5, 5))
    assert not torch.equal(part, unguided) and not torch.equal(part, images(conditional_model, cfg_scale=3.0))


def test_the_interval_guides_exactly_the_steps_whose_sigma_lies_in_it(sd_folder):
    model = load_model(sd_folder)
    batches = []
    model.denoiser.unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    scheduler = scheduler_for("ddim", model.sampler_config)
    scheduler.set_timesteps(10)
    sigma = noise_levels(model.noise_schedule)
    sigmas = [sigma(t) for t in scheduler.timesteps]
    low, high = sorted(sigmas)[3], sorted(sigmas)[7]  # (low, high]: four steps
    generate(model, GenerationRequest(1, sampler="ddim", steps=10, prompts="a red circle", cfg_scale=5.0,
                                      cfg_interval=(low, high)))
    assert batches == [2 if low < s <= high else 1 for s in sigmas] and batches.count(2) == 4


def test_the_folder_records_the_default_guidance(conditional_model, tmp_path):
    model = load_model(conditional_model)
    assert guidance_of(model) == ClassifierFreeGuidance(model.default_cfg_scale)  # none recorded: plain
    model.info.guidance = {"cfg_scale": 4.0, "cfg_interval": "0.5-5", "cfg_rescale": 0.5}
    recorded = guidance_of(model)
    assert recorded == ClassifierFreeGuidance(4.0, (0.5, 5.0), 0.5) and model.default_cfg_scale == 4.0
    labels = torch.tensor([1, 2])
    given = GenerationRequest(2, steps=4, class_labels=labels, cfg_scale=4.0, cfg_interval=(0.5, 5), cfg_rescale=0.5)
    assert torch.equal(generate(model, GenerationRequest(2, steps=4, class_labels=labels)), generate(model, given))


def test_sd_folders_keep_plain_7_5(sd_folder):
    assert guidance_of(load_model(sd_folder)) == ClassifierFreeGuidance(7.5)


@pytest.mark.parametrize("text, expected", [("0.3-5", (0.3, 5.0)), ("1-inf", (1.0, math.inf)),
                                            (" 0-2.5 ", (0.0, 2.5)), ("1e-3-5", (0.001, 5.0)), ((0, 3), (0.0, 3.0))])
def test_parse_interval(text, expected):
    assert parse_interval(text) == expected


@pytest.mark.parametrize("options, message", [
    ({"interval": (5, 1)}, r"interval 5-1 must be two noise levels LOW-HIGH with 0 <= LOW < HIGH"),
    ({"interval": (-1, 1)}, "0 <= LOW < HIGH"),
    ({"rescale": -0.1}, r"rescale must be a number from 0 \(none\) to 1 \(full\), got -0.1"),
    ({"rescale": 1.5}, "got 1.5"),
    ({"rescale": float("nan")}, "rescale must be a number"),
    ({"scale": -1}, "scale must be a finite number, 0 or more"),
])
def test_bad_values_are_refused(options, message):
    with pytest.raises(InputError, match=message):
        ClassifierFreeGuidance(options.get("scale", 3.0), options.get("interval", (0, math.inf)),
                               options.get("rescale", 0.0))


def one_error(capsys, argv) -> str:
    try:
        code = main(["sample", "--steps", "2", "-n", "1", *argv])
    except SystemExit as e:  # argparse's own refusal of a non-number
        code = e.code
    err = capsys.readouterr().err
    lines = re.findall(r"error: [^\r\n]*", err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["--cfg-interval", "5-1"], "interval 5-1 must be two noise levels"),
    (["--cfg-interval", "abc"], r"--cfg-interval 'abc' is not LOW-HIGH"),
    (["--cfg-interval", "1-x"], "is not LOW-HIGH"),
    (["--cfg-interval", "3"], "is not LOW-HIGH"),
    (["--cfg-rescale", "-0.5"], "rescale must be a number from 0"),
    (["--cfg-rescale", "2"], "rescale must be a number from 0 .* got 2"),
    (["--cfg-rescale", "much"], "invalid float value: 'much'"),
])
def test_cli_refuses_bad_guidance_in_one_line(capsys, sd_folder, tmp_path, argv, message):
    out = tmp_path / "o.png"
    line = one_error(capsys, ["--model", str(sd_folder), "--prompt", "a red circle", "--out", str(out), *argv])
    assert re.search(message, line), line
    assert not out.exists()


def test_png_settings_record_the_interval_and_rescale(capsys, sd_folder, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(sd_folder), "--prompt", "a red circle", "-n", "1", "--steps", "2",
                 "--cfg-scale", "5", "--cfg-interval", "0.5-8", "--cfg-rescale", "0.7", "--out", str(out)]) == 0
    settings = png_settings(out)
    assert (settings["cfg_scale"], settings["cfg_interval"], settings["cfg_rescale"]) == (5.0, "0.5-8", 0.7)
    plain = tmp_path / "plain.png"
    assert main(["sample", "--model", str(sd_folder), "--prompt", "a red circle", "-n", "1", "--steps", "2",
                 "--out", str(plain)]) == 0
    settings = png_settings(plain)
    assert settings["cfg_scale"] == 7.5 and "cfg_interval" not in settings and "cfg_rescale" not in settings


def test_the_demo_takes_the_interval_and_rescale(sd_folder, tmp_path):
    from difflab.app import build_demo
    from difflab.app.guides import Guides
    from difflab.app.service import Generator, Limits, Request

    model = load_model(sd_folder)
    generate = Generator(model, "tiny", Limits(), Guides(), tmp_path)
    fast = dict(sampler="ddim", steps=4, count=1, seed=2, prompt="a fox", width=16, height=16)
    plain = generate(Request(**fast))[0][0]
    (guided, text), = generate(Request(**fast, cfg_interval="0.5-8", cfg_rescale=0.7))
    assert "CFG 7.5, at σ 0.5-8, rescale 0.7" in text
    settings = png_settings(guided)
    assert (settings["cfg_interval"], settings["cfg_rescale"]) == ("0.5-8", 0.7)
    assert "cfg_interval" not in png_settings(plain) and "cfg_rescale" not in png_settings(plain)
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(guided)))
    for change, message in (({"cfg_interval": "5-1"}, "interval 5-1 must be two noise levels"),
                            ({"cfg_rescale": 2}, "guidance rescale must be a number from 0 to 1")):
        with pytest.raises(DifflabError, match=message) as caught:
            generate(Request(**fast, **change))
        assert "\n" not in str(caught.value)
    demo = build_demo(sd_folder, limits=Limits(max_steps=10, max_images=4))
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"cfg-interval", "cfg-rescale"} <= ids
    (txt2img,) = [f.fn for f in demo.fns.values() if f.api_name == "txt2img"]
    gallery, files = txt2img("a fox", "", "ddim", 4, 2, 1, 16, 16, 7.5, "#ff0000", 0, 0, "", 1.0, "0.5-8", 0.7)
    assert png_settings(files[0])["cfg_interval"] == "0.5-8"


def test_the_folders_difflab_json_carries_the_default(conditional_model, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(conditional_model, tmp_path / "model")
    info = json.loads((folder / "difflab.json").read_text())
    info["guidance"] = {"cfg_scale": 3.0, "cfg_interval": "0-5", "cfg_rescale": 0.3}
    (folder / "difflab.json").write_text(json.dumps(info))
    assert guidance_of(load_model(folder)) == ClassifierFreeGuidance(3.0, (0.0, 5.0), 0.3)


def test_eval_refuses_a_bad_interval_before_loading_the_model(capsys, tmp_path):
    code = main(["eval", "--model", str(tmp_path / "nowhere"), "--cfg-interval", "2-1"])
    err = capsys.readouterr().err
    assert code == 2 and "interval 2-1 must be two noise levels" in err and "Traceback" not in err, err
