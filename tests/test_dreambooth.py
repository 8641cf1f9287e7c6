"""DreamBooth: the one trainer on instance (and class) images of a tiny text-to-image model trained here;
the loss groups in metrics.csv; class images generated once; full and LoRA outputs that plain diffusers
loads with the same images; one-line errors for bad input."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import tiny_sd
from difflab.cli import main
from difflab.config import DreamBoothConfig, dreambooth_defaults
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.models.model import TrainingRecord
from difflab.storage import lora
from difflab.storage.folder import load_model
from difflab.training import dreambooth as db
from difflab.training.run_folder import MetricsLog, RunFolder
from difflab.training.trainer import train
from test_text_training import text_config

PROMPT = "a sks shape"
CLASS_PROMPT = "a shape"


def star(colour=(40, 80, 220), size=16, turn=0.0) -> Image.Image:
    """A five-pointed star on white: a subject the shapes model never saw."""
    image = Image.new("RGB", (size * 4, size * 4), "white")
    centre, points = size * 2, []
    for i in range(10):
        radius = size * (1.6 if i % 2 == 0 else 0.7)
        angle = math.pi * i / 5 - math.pi / 2 + turn
        points.append((centre + radius * math.cos(angle), centre + radius * math.sin(angle)))
    ImageDraw.Draw(image).polygon(points, fill=colour)
    return image.resize((size, size), Image.LANCZOS)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny text-to-image model trained on shapes (its own tokenizer learnt from the captions)."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(text_config(steps=4, vae_steps=4, data="shapes:n=48"), run)
    return run / "model"


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stars")
    for i in range(5):
        star(turn=0.2 * i).save(folder / f"star_{i}.png")
    return folder


def args(base, instances, out, *extra) -> list[str]:
    return ["-q", "dreambooth", "--model", str(base), "--instance-data", str(instances), "--instance-prompt", PROMPT,
            "--out", str(out), "--steps", "4", "--sample-every", "2", "--sample-steps", "2", "--sample-count", "2",
            "--checkpoint-every", "0", "--log-every", "1", "--precision", "no", *extra]


def prior(count: int = 4) -> list[str]:
    return ["--prior-preservation", "--class-prompt", CLASS_PROMPT, "--num-class-images", str(count)]


def tensors(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


# ---- a full fine-tune with prior preservation ---------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(base, instances, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(args(base, instances, out, *prior())) == 0
    return out


def test_a_full_run_trains_the_unet_only_and_saves_a_stable_diffusion_folder(base, full_run):
    from diffusers import StableDiffusionPipeline

    before, after = load_model(base), load_model(full_run)
    assert changed(tensors(before.unet), after.unet)
    assert not changed(tensors(before.prompts.text_encoder), after.prompts.text_encoder)  # frozen by default
    assert not changed(tensors(before.codec.vae), after.codec.vae)
    pipe = StableDiffusionPipeline.from_pretrained(full_run / "model")  # plain diffusers
    assert pipe.unet.config.sample_size == after.unet.config.sample_size
    info = json.loads((full_run / "model" / "difflab.json").read_text())["training"]
    assert info["instance_prompt"] == PROMPT and info["token"] == "sks" and info["class_images"] == 4
    card = (full_run / "model" / "README.md").read_text()
    assert f"`{PROMPT}` (the subject's token: `sks`)" in card and f'--prompt "{PROMPT}"' in card
    assert f"`{base}`" in card  # the base model is named


def test_metrics_have_the_instance_and_prior_losses_and_the_grid_is_written(full_run):
    rows = MetricsLog(full_run / "metrics.csv").rows
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {"loss_instance", "loss_prior"} <= set(rows[0])
    values = [float(r[c]) for r in rows for c in ("loss_instance", "loss_prior") if r[c] != ""]
    assert values and all(v > 0 for v in values)
    assert sorted(p.name for p in (full_run / "samples").glob("step_*.png")) == ["step_000002.png",
                                                                                 "step_000004.png"]
    assert len(list((full_run / "class_images").glob("*.png"))) == 4


def test_the_loss_is_the_prior_weighted_mean_of_the_groups(base, instances, tmp_path):
    # a batch of the whole data (4 instance images, repeated from 5? no: 4 class -> 5 instance + 4 class)
    out = tmp_path / "run"
    assert main(args(base, instances, out, *prior(5), "--prior-loss-weight", "3", "--batch-size", "10",
                     "--steps", "2", "--sample-every", "0")) == 0
    for row in MetricsLog(out / "metrics.csv").rows:
        li, lp = float(row["loss_instance"]), float(row["loss_prior"])
        assert float(row["loss"]) == pytest.approx((5 * li + 3 * 5 * lp) / 10, rel=1e-4)


def test_class_images_are_generated_once_by_the_one_sampler_and_topped_up(base, tmp_path):
    config = dreambooth_defaults()
    config.model.base, config.run.sample_steps = str(base), 2
    config.dreambooth.class_prompt, config.dreambooth.num_class_images = CLASS_PROMPT, 2
    model, run = load_model(base), RunFolder(tmp_path)
    first = db.class_images(config, model, run)
    files = sorted((tmp_path / db.CLASS_IMAGES).glob("*.png"))
    stamps = [f.stat().st_mtime_ns for f in files]
    config.dreambooth.num_class_images = 3
    again = db.class_images(config, model, run)
    assert torch.equal(again[:2], first) and len(again) == 3
    assert [f.stat().st_mtime_ns for f in files] == stamps  # kept, not made again
    expected = generate(model, GenerationRequest(3, sampler=config.run.sample_sampler, steps=2, seed=0,
                                                 prompts=CLASS_PROMPT, precision=config.optim.precision))
    assert (again.float() - expected.mul(255)).abs().max() <= 1.0  # image i from seed i, as PNG


def test_class_data_is_used_instead_of_generating(base, instances, tmp_path):
    config = dreambooth_defaults()
    config.model.base, config.dreambooth.class_data, config.dreambooth.num_class_images = str(base), str(instances), 3
    images = db.class_images(config, load_model(base), RunFolder(tmp_path))
    assert len(images) == 3 and not (tmp_path / db.CLASS_IMAGES).exists()


# ---- LoRA ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(base, instances, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert main(args(base, instances, out, "--lora", "--rank", "2", "--train-text-encoder", "--lr", "0.01")) == 0
    return out


def test_a_lora_run_saves_diffusers_lora_weights_that_give_difflabs_images(base, lora_run):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from difflab.diffusion.samplers import scheduler_for

    weights = lora_run / "model" / lora.LORA_WEIGHTS
    tensors_ = load_file(str(weights))
    assert any(k.startswith("unet.") for k in tensors_) and any(k.startswith("text_encoder.") for k in tensors_)
    assert weights.stat().st_size < 0.2 * (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    prompts = [PROMPT, "a blue sks shape at the bottom right"]
    ours_model = load_model(base)
    lora.apply_lora(ours_model, lora_run, 0.8)
    ours = generate(ours_model, GenerationRequest(2, sampler="ddim", steps=3, seed=0, prompts=prompts, cfg_scale=3.0))
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.scheduler = scheduler_for("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_run / "model"))
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    theirs = pipe(prompts, negative_prompt=["", ""], guidance_scale=3.0, num_inference_steps=3, generator=generators,
                  output_type="np", cross_attention_kwargs={"scale": 0.8}).images
    assert np.abs(theirs - ours.permute(0, 2, 3, 1).numpy()).max() < 1e-5
    plain = generate(load_model(base), GenerationRequest(2, sampler="ddim", steps=3, seed=0, prompts=prompts,
                                                         cfg_scale=3.0))
    assert (plain - ours).abs().max() > 1e-3  # the adapters learnt something


def test_the_lora_card_names_base_prompt_and_token_and_sample_takes_the_run(base, lora_run, tmp_path):
    card = (lora_run / "model" / "README.md").read_text()
    assert f"`{base}`" in card and f"`{PROMPT}` (the subject's token: `sks`)" in card
    assert "difflab sample --model" in card and "load_lora_weights" in card
    assert {"loss_instance"} <= set(MetricsLog(lora_run / "metrics.csv").rows[0])
    out = tmp_path / "grid.png"
    assert main(["-q", "sample", "--model", str(base), "--lora", str(lora_run), "--lora-scale", "0.5",
                 "--prompt", PROMPT, "-n", "1", "--steps", "2", "--out", str(out)]) == 0
    assert out.is_file()


def test_a_lora_run_resumes_from_its_checkpoint(base, instances, tmp_path):
    out = tmp_path / "run"
    extra = ("--lora", "--rank", "2", "--checkpoint-every", "2", "--sample-every", "0")
    assert main(args(base, instances, out, *extra, "--steps", "2")) == 0
    first = load_file_tensors(out / "model" / lora.LORA_WEIGHTS)
    assert main(args(base, instances, out, *extra, "--steps", "4", "--resume")) == 0
    assert [int(r["step"]) for r in MetricsLog(out / "metrics.csv").rows] == [1, 2, 3, 4]
    second = load_file_tensors(out / "model" / lora.LORA_WEIGHTS)
    assert first.keys() == second.keys() and any(not torch.equal(first[k], second[k]) for k in first)


def load_file_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- the subject's token ------------------------------------------------------------------------------

def test_a_prompt_without_a_rare_token_is_warned_about_naming_its_tokens(base, caplog):
    tokenizer = load_model(base).prompts.tokenizer
    assert db.check_token(PROMPT, CLASS_PROMPT, tokenizer) == "sks"  # not a word of the captions: rare
    with caplog.at_level(logging.WARNING, logger="difflab"):
        assert db.check_token("a red circle", "a circle", tokenizer) is None
    message = caplog.records[-1].getMessage()
    assert "no rare token" in message and "'red' is a common token" in message and "red</w>" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="difflab"):
        assert db.check_token("a circle", "a circle", tokenizer) is None
    assert "every word is in the class prompt" in caplog.records[-1].getMessage()


def test_many_instance_images_are_warned_about(tmp_path, caplog):
    for i in range(db.MANY_INSTANCE_IMAGES + 1):
        star(turn=i / 50).save(tmp_path / f"{i:03d}.png")
    with caplog.at_level(logging.WARNING, logger="difflab"):
        images = db.instance_images(str(tmp_path), 16)
    assert images.shape == (db.MANY_INSTANCE_IMAGES + 1, 3, 16, 16)
    assert "DreamBooth is meant for a few" in caplog.text


# ---- bad input: one line, exit 2 ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    from conftest import tiny_config

    config = tiny_config(steps=1)
    return train(config, tmp_path_factory.mktemp("pixel") / "run")


def bad_input(case, tmp_path, base, instances, lora_run, pixel_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    too_many = tmp_path / "many"
    too_many.mkdir()
    for i in range(db.MOST_INSTANCE_IMAGES + 1):
        (too_many / f"{i:04d}.png").touch()
    other = tiny_sd.build(tmp_path / "other", "text")
    run = tmp_path / "run"
    return {
        "empty": (args(base, empty, run), "no images in --instance-data folder"),
        "unreadable": (args(base, broken, run), "none of the 1 images"),
        "too many": (args(base, too_many, run), "holds 1001 images, more than the 1000"),
        "prior without class": (args(base, instances, run, "--prior-preservation"),
                                "--prior-preservation needs the class"),
        "lora on a pixel model": (args(pixel_model, instances, run, "--lora"), "LoRA files adapt text-to-image"),
        "lora of another base": (["-q", "sample", "--model", str(other), "--lora", str(lora_run), "--prompt", "a",
                                  "--out", str(tmp_path / "x.png")], "does not fit this model"),
        "rank without lora": (args(base, instances, run, "--rank", "2"), "--lora-rank is the rank of LoRA adapters"),
    }[case]


@pytest.mark.parametrize("case", ["empty", "unreadable", "too many", "prior without class", "lora on a pixel model",
                                  "lora of another base", "rank without lora"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, base, instances, lora_run, pixel_model, capsys):
    argv, message = bad_input(case, tmp_path, base, instances, lora_run, pixel_model)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difflab: error:") and message in err[0], err


def test_the_config_round_trips_and_a_resume_takes_the_saved_settings(full_run):
    from difflab.config import load_config

    saved = load_config(full_run / "config.toml", DreamBoothConfig)
    assert saved.dreambooth.instance_prompt == PROMPT and saved.dreambooth.prior_preservation
    assert saved.optim.lr == db.default_lr(TrainingRecord(lr=1e-3), lora=False) == 5e-5  # the base was trained at 1e-3
    assert db.default_lr(TrainingRecord(), lora=True) == 1e-4 and db.default_lr(TrainingRecord(), lora=False) == 5e-6


def test_finetune_takes_a_text_to_image_model_on_captioned_data(base, tmp_path):
    out = tmp_path / "ft"
    assert main(["-q", "finetune", "--from", str(base), "--data", "shapes:n=16", "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--sample-every", "0", "--sample-steps", "2", "--sample-count", "2",
                 "--checkpoint-every", "0", "--precision", "no", "--ema-decay", "0"]) == 0
    before, after = load_model(base), load_model(out)
    assert changed(tensors(before.unet), after.unet)
    assert not changed(tensors(before.prompts.text_encoder), after.prompts.text_encoder)
    info = json.loads((out / "model" / "difflab.json").read_text())
    assert info["base_model"] == str(base) and info["training"]["text_encoder_trained"] is False
    assert "loss_instance" not in MetricsLog(out / "metrics.csv").rows[0]  # one loss group: no extra columns


@pytest.mark.slow
def test_the_benchmark_runs_on_a_tiny_model(base, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "bench" / "dreambooth.py"), "--base", str(base), "--out",
                             str(tmp_path), "--quick", "--settings", "lora+prior,textual-inversion"],
                            capture_output=True, text=True, env={**__import__("os").environ,
                                                                  "PYTHONPATH": str(root / "src")})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert set(report["runs"]) == {"lora+prior", "textual-inversion"}
    for figures in (report["base_model"], *report["runs"].values()):
        assert -1 <= figures["subject_fidelity"] <= 1 and 0 <= figures["recontext"]["both"] <= 1
    assert report["runs"]["lora+prior"]["saved_mib"] < report["full_unet_mib"]
    assert report["runs"]["textual-inversion"]["saved_bytes"] < 2**20 * report["runs"]["lora+prior"]["saved_mib"]
    assert (tmp_path / "instances.png").is_file() and (tmp_path / "lora+prior.png").is_file()
    assert len(list((tmp_path / "lora+prior" / "class_images").glob("*.png"))) == 2
