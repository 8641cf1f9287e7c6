"""A new user's mistakes on the sampling path (issue 28, points 1, 2, 4, 5, 6, 8, 11, 12, 18, 24): each
kind is one check in diffusion/request.py (or where the request's files are written), reached by the
CLI before any work; refused in one line with exit status 2, nothing written, no input touched."""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_sd
from difflab.cli import main
from difflab.images import a1111_text, png_settings


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample-mistakes")
    return {kind: tiny_sd.build(root / kind, kind) for kind in ("text", "inpaint", "upscale")}


@pytest.fixture(scope="module")
def damaged_loras(models, tmp_path_factory):
    """LoRA files whose weights hold NaN or infinities (a damaged copy): each would draw black images."""
    from difflab.models import lora as adapters
    from difflab.storage import lora
    from difflab.storage.folder import load_model

    root = tmp_path_factory.mktemp("damaged-loras")
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        model = load_model(models["text"])
        parameters = adapters.add_lora(model, 2)
        with torch.no_grad():
            for p in parameters:
                p.normal_()
            parameters[0].view(-1)[0] = value  # one value is enough to black out every image
        lora.save_lora(model, root / name)
    return root


def picture(folder, name, array) -> str:
    Image.fromarray(array).save(folder / name)
    return str(folder / name)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    return {
        "photo": picture(tmp_path, "photo.png", rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)),
        "black": picture(tmp_path, "black.png", np.zeros((24, 40), dtype=np.uint8)),
        "white": picture(tmp_path, "white.png", np.full((24, 40), 255, dtype=np.uint8)),
        "small": picture(tmp_path, "small.png", rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)),
        "dot": picture(tmp_path, "dot.png", rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)),
    }


def digests(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def one_error(capsys, argv) -> str:
    code = main(["sample", "--steps", "2", "-n", "1", *argv])
    err = capsys.readouterr().err
    lines = re.findall(r"difflab: error: [^\r\n]*", err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("model, argv, message", [
    # 1: an output that would replace an input (the inputs are compared after links are followed)
    ("text", ["--image", "{photo}", "--out", "{photo}"], r"--out .*photo\.png would replace the image given as input"),
    ("text", ["--image", "{photo}", "--out", "{tmp}/./sub/../photo.png"], "would replace the image given as input"),
    ("text", ["--image", "{photo}", "--out", "{tmp}/link.png"], "would replace the image given as input"),
    ("text", ["--image", "{photo}", "--out", "{tmp}/hard.png"], "would replace the image given as input"),
    ("inpaint", ["--image", "{photo}", "--mask", "{white}", "--out", "{white}"], "would replace the mask given"),
    ("text", ["--image", "{photo}", "--depth", "{black}", "--out", "{black}"], "would replace the depth map given"),
    ("text", ["--image", "{tmp}/each/000002.png", "--seed", "1", "--out-dir", "{tmp}/each", "--out", "{tmp}/o.png"],
     r"--out-dir .*each would replace the image 000002\.png given as input"),
    # 4: a suffix difflab cannot write
    ("text", ["--out", "{tmp}/o.txt"], r"--out .*o\.txt: difflab writes images as \.png, \.jpg \(or \.jpeg\) and "
                                       r"\.webp, the format its suffix names, not \.txt"),
    ("text", ["--out", "{tmp}/grid"], "not a name with no suffix; give, for example, .*grid.png"),
    # 5: an all-black mask repaints nothing (with an inpainting model and with a plain one)
    ("inpaint", ["--image", "{photo}", "--mask", "{black}"], r"the mask .*black\.png is all black: nothing would be "
                                                             "repainted"),
    ("text", ["--image", "{photo}", "--mask", "{black}"], "is all black: nothing would be repainted"),
    # 6: an upscaler input smaller than one step of its size
    ("upscale", ["--image", "{dot}"], "the image 1×1 is too small for the ×4 upscaler: it takes sides of at least 4"),
    # 12: seeds torch's generators do not take
    ("text", ["--seed", "99999999999999999999"], "--seed must be a whole number from 0 to 18446744073709551615; got"),
    ("text", ["--seed", "-1"], "--seed must be a whole number from 0 to 18446744073709551615; got -1"),
    ("text", ["--seed", str(2 ** 64 - 1), "-n", "2"], r"SEED\+i, so with 2 images at most 18446744073709551614\); got"),
    # 18: sizes that are no size, strength said one way, a depth model for a model that takes none
    ("text", ["--width", "0"], r"--width must be a positive number of pixels \(got 0\)"),
    ("text", ["--height", "-16"], r"--height must be a positive number of pixels \(got -16\)"),
    ("text", ["--strength", "0.5"], r"--strength is how much of --image is repainted \(1: everything\): it needs an "
                                    "image"),
    ("text", ["--image", "{photo}", "--strength", "2"], r"--strength must be in \(0, 1\] \(got 2.0\): it is how "
                                                        "much of --image is repainted, 1 everything"),
    ("text", ["--image", "{photo}", "--depth-model", "Intel/dpt-hybrid-midas"],
     "--depth-model is for depth-to-image models .*; this is a text-to-image model, which takes none"),
    ("inpaint", ["--image", "{photo}", "--mask", "{white}", "--depth-model", "Intel/dpt-hybrid-midas"],
     "--depth-model is for depth-to-image models .*this is a StableDiffusionInpaintPipeline model"),
])
def test_a_sampling_mistake_is_one_line_and_touches_nothing(capsys, monkeypatch, tmp_path, models, files, model,
                                                           argv, message):
    def no_download(*args, **kwargs):
        raise AssertionError("the depth model was fetched before the request was checked")

    monkeypatch.setattr("difflab.models.depth.load_depth_estimator", no_download)
    os.symlink(files["photo"], tmp_path / "link.png")
    os.link(files["photo"], tmp_path / "hard.png")
    (tmp_path / "each").mkdir()
    Image.open(files["photo"]).save(tmp_path / "each" / "000002.png")
    before = digests(tmp_path)
    argv = [a.format(tmp=tmp_path, **files) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o.png")]
    error = one_error(capsys, ["--model", str(models[model]), "--prompt", "a", *argv])
    assert re.search(message, error), error
    assert digests(tmp_path) == before  # nothing written, no input replaced


@pytest.mark.parametrize("damage", ["nan", "inf"])
def test_a_damaged_lora_is_named_not_drawn_black(capsys, tmp_path, models, damaged_loras, damage):
    """2: a LoRA whose weights are NaN or infinite is named as damaged before any sampling."""
    error = one_error(capsys, ["--model", str(models["text"]), "--prompt", "a", "--lora", str(damaged_loras / damage),
                               "--out", str(tmp_path / "o.png")])
    kind = "NaN" if damage == "nan" else "infinite"
    assert re.search(rf"{damage}/pytorch_lora_weights\.safetensors is damaged: 1 of the \d+ values of .*lora.* are "
                     rf"{kind}", error), error
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")])
def test_out_is_written_in_the_format_its_suffix_names_with_the_settings(tmp_path, models, files, suffix, fmt):
    """4 and 8: JPEG and WebP too, with difflab's settings and A1111's text (EXIF UserComment, as A1111
    writes it); A1111's Size is one image's size, not the grid's; the default strength and the mode
    are recorded."""
    out = tmp_path / f"grid{suffix}"
    assert main(["-q", "sample", "--model", str(models["text"]), "--prompt", "a fox", "--image", files["photo"],
                 "--steps", "2", "-n", "1", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == fmt and image.size == (44, 28)  # one 40×24 image and the grid's border
    settings = png_settings(out)
    assert settings["mode"] == "img2img" and settings["strength"] == 0.8  # the default, recorded
    assert (settings["width"], settings["height"], settings["prompt"]) == (40, 24, "a fox")
    text = a1111_text(out)
    assert text.startswith("a fox\n") and "Size: 40x24," in text and "Denoising strength: 0.8" in text


def test_inpainting_records_its_mode_and_default_strength(tmp_path, models, files):
    out = tmp_path / "o.png"
    assert main(["-q", "sample", "--model", str(models["inpaint"]), "--prompt", "a", "--image", files["photo"],
                 "--mask", files["small"], "--steps", "2", "-n", "2", "--out", str(out)]) == 0
    assert png_settings(out)["mode"] == "inpaint" and png_settings(out)["strength"] == 1.0
    assert "Size: 40x24," in a1111_text(out)


def test_an_all_white_mask_is_said_to_be_text_to_image_once(capsys, tmp_path, models, files):
    """5: an all-white mask repaints the whole image: it runs, and says so once."""
    assert main(["sample", "--model", str(models["inpaint"]), "--prompt", "a", "--image", files["photo"],
                 "--mask", files["white"], "--steps", "2", "-n", "2", "--batch-size", "1",
                 "--out", str(tmp_path / "o.png")]) == 0
    err = capsys.readouterr().err
    notices = re.findall(r"is all white: the whole image is repainted, so this is text-to-image at the image's "
                         r"size, 40×24", err)
    assert len(notices) == 1, err


def test_the_upscaler_says_what_size_it_used(capsys, tmp_path, models, files):
    """6: a 10×6 input is resized to 8×4 (multiples of the VAE's factor, as diffusers does): said, with
    the result's size, which the image then has."""
    out = tmp_path / "up"
    assert main(["sample", "--model", str(models["upscale"]), "--prompt", "a", "--image", files["small"],
                 "--steps", "2", "-n", "1", "--out", str(tmp_path / "o.png"), "--out-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert ("the upscaler takes sides that are multiples of 4: the 10×6 image is resized to 8×4, so the result is "
            "32×16, not 40×24") in err
    with Image.open(out / "000000.png") as image:
        assert image.size == (32, 16)


def test_the_workload_estimate_uses_the_requested_and_the_input_size(monkeypatch, tmp_path, models, files):
    """11: memory and time are estimated at the size the images will have: --width/--height, the input
    image's, the upscaler's input × 4 — not the model's own size."""
    from difflab import workload
    from difflab.diffusion.planning import planned_size
    from difflab.errors import ConfigError
    from difflab.storage.folder import load_model

    text, upscaler = load_model(models["text"]), load_model(models["upscale"])
    assert planned_size(text, None, None, None) == (text.info.image_size,) * 2
    assert planned_size(text, files["photo"], None, None) == (40, 24)
    assert planned_size(text, files["photo"], 64, 32) == (64, 32)
    assert planned_size(upscaler, files["small"]) == (32, 16)
    with pytest.raises(ConfigError, match=r"^-n 1 images of 100000×100000 would take .* of memory and .* is "
                                          r"available; ask for a smaller --width/--height"):
        workload.check_workload(text, 1, 20, 64, yes=True, size=(100_000, 100_000))
    timed = []
    monkeypatch.setattr(workload, "_timed", lambda model, batch, w, h: timed.append((w, h)) or 1e-4 * w * h)
    with pytest.raises(ConfigError, match=r"^-n 1 images 4000×4000 × 20 steps would take about .* hours on cpu "
                                          r"\(measured here\); lower -n, --steps or the size, or pass --yes"):
        workload.check_workload(text, 1, 20, 64, yes=False, size=(4000, 4000))
    assert max(w * h for w, h in timed) <= workload.TIMED_AT_MOST * text.size_factor ** 2  # timing stays small
    workload.check_workload(text, 1, 20, 64, yes=False)  # the model's own 16×16: not even timed


def test_the_cli_refuses_a_huge_size_before_sampling(capsys, tmp_path, models):
    error = one_error(capsys, ["--model", str(models["text"]), "--prompt", "a", "--width", "100000",
                               "--height", "100000", "--out", str(tmp_path / "o.png")])
    # the memory estimate of sampling at the asked size refuses it (the images alone would take 140 GB)
    assert re.search(r"peak memory of sampling 1 image of 100000×100000 on cpu: about \d+\.\d GB", error)


def test_help_puts_the_size_under_every_model_and_says_strength_one_way(capsys):
    """24 and 18: --width/--height are for every model; --strength is how much is repainted."""
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    help_text = capsys.readouterr().out.split("options:")[1]
    text_group = help_text.split("text-to-image models")[1].split("starting from an image")[0]
    assert "--width" not in text_group and "--height" not in text_group
    assert re.search(r"--width WIDTH\s+image width in pixels, for any model", help_text)
    strength = " ".join(help_text.split("--strength STRENGTH")[1].split("--mask")[0].split())
    assert "how much of --image is repainted" in strength and "1 repaints everything" in strength
    assert "keep" not in strength
