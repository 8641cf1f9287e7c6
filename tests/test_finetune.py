"""difflab finetune: difflab train's loop started from a pretrained model, and its one-line errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab.cli import main
from difflab.config import load_config

QUICK = ["--steps", "6", "--batch-size", "8", "--warmup-steps", "2", "--sample-every", "0", "--checkpoint-every", "3",
         "--sample-count", "2", "--sample-steps", "2", "--log-every", "3", "--precision", "no"]


def unet_weights(folder: Path) -> dict:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def finetune(*args: str, quiet: bool = True) -> int:
    return main(["-q"] * quiet + ["finetune", *args, *QUICK])


@pytest.fixture(scope="module")
def rgb_pipeline(tmp_path_factory) -> Path:
    """A plain diffusers DDPMPipeline folder (no difflab.json): a tiny 8x8 RGB UNet, epsilon, linear."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, add_attention=False)
    folder = tmp_path_factory.mktemp("diffusers") / "ddpm-rgb"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=200)).save_pretrained(folder)
    return folder


def test_fine_tuning_a_diffusers_pipeline_moves_its_weights_and_leaves_it_untouched(tmp_path, rgb_pipeline, capsys):
    from diffusers import DDPMPipeline

    before = fingerprint(rgb_pipeline)
    out = tmp_path / "ft"
    assert finetune("--from", str(rgb_pipeline), "--data", "digits", "--out", str(out), quiet=False) == 0
    assert f"note: digits is grey and {rgb_pipeline} takes RGB images; converting" in capsys.readouterr().err
    assert fingerprint(rgb_pipeline) == before  # the base model's files are untouched

    base, tuned = unet_weights(rgb_pipeline), unet_weights(out / "model")
    assert base.keys() == tuned.keys() and any(not torch.equal(base[k], tuned[k]) for k in base)
    pipe = DDPMPipeline.from_pretrained(out / "model")  # plain diffusers
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.in_channels == 3
    assert pipe.scheduler.config.num_train_timesteps == 200 and pipe.scheduler.config.prediction_type == "epsilon"
    info = json.loads((out / "model" / "difflab.json").read_text())
    assert info["base_model"] == str(rgb_pipeline) and info["data"] == "digits" and info["channels"] == 3
    assert info["training"]["steps"] == 6 and "preset" not in info["training"]
    card = (out / "model" / "README.md").read_text()
    assert f"fine-tuned from `{rgb_pipeline}`" in card and "| base model |" in card and "`digits`" in card

    # the saved settings say what was trained, and run it again
    config = load_config(out / "config.toml")
    assert config.model.base == str(rgb_pipeline) and config.optim.lr == 1e-4 and config.optim.warmup_steps == 2
    assert (config.data.image_size, config.data.channels) == (8, 3)
    assert (config.model.schedule, config.model.prediction, config.model.timesteps) == ("linear", "epsilon", 200)
    assert main(["-q", "train", "--config", str(out / "config.toml"), "--out", str(tmp_path / "again")]) == 0
    again = unet_weights(tmp_path / "again" / "model")
    assert all(torch.equal(tuned[k], again[k]) for k in tuned)


def test_a_fine_tune_resumes_and_a_difflab_model_keeps_its_preset(tmp_path, trained_model, labelled_folder):
    out = tmp_path / "ft"
    assert finetune("--from", str(trained_model), "--data", str(labelled_folder), "--out", str(out)) == 0
    assert main(["-q", "finetune", "--out", str(out), "--resume", "--steps", "9"]) == 0
    info = json.loads((out / "model" / "difflab.json").read_text())
    assert info["training"]["steps"] == 9 and info["training"]["preset"] == "tiny" and info["channels"] == 1
    assert load_config(out / "config.toml").model.base == str(trained_model)


def error_of(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_text_to_image_model_needs_captions_and_other_stable_diffusion_kinds_are_refused(tmp_path, capsys):
    import tiny_sd

    sd = tiny_sd.build(tmp_path / "sd", "text")
    inpaint = tiny_sd.build(tmp_path / "inpaint", "inpaint")
    capsys.readouterr()  # what building them printed
    err = error_of(capsys, finetune("--from", str(sd), "--data", "digits", "--out", str(tmp_path / "ft")))
    assert "is a text-to-image model and digits has no captions" in err
    err = error_of(capsys, finetune("--from", str(inpaint), "--data", "shapes:n=8", "--out", str(tmp_path / "ft2")))
    assert "is a StableDiffusionInpaintPipeline" in err and "not inpainting, depth or upscaling models" in err
    assert not (tmp_path / "ft2").exists()


def test_a_folder_without_a_unet(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    err = error_of(capsys, finetune("--from", str(folder), "--data", "digits", "--out", str(tmp_path / "ft")))
    assert "has no UNet" in err and not (tmp_path / "ft").exists()


def test_corrupt_weights(tmp_path, trained_model, capsys):
    folder = Path(shutil.copytree(trained_model, tmp_path / "model"))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 100)
    err = error_of(capsys, finetune("--from", str(folder), "--data", "digits", "--out", str(tmp_path / "ft")))
    assert "diffusion_pytorch_model.safetensors is damaged" in err and not (tmp_path / "ft").exists()


def test_pickled_weights_need_the_opt_in(tmp_path, trained_model, capsys):
    folder = Path(shutil.copytree(trained_model, tmp_path / "model"))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    err = error_of(capsys, finetune("--from", str(folder), "--data", "digits", "--out", str(tmp_path / "ft")))
    assert "is a pickle" in err and "--allow-pickle" in err and not (tmp_path / "ft").exists()
    assert finetune("--from", str(folder), "--allow-pickle", "--data", "digits", "--out", str(tmp_path / "ft")) == 0


def test_settings_the_base_model_decides_cannot_be_given(tmp_path, trained_model, capsys):
    out = str(tmp_path / "ft")
    err = error_of(capsys, main(["train", "--from", str(trained_model), "--schedule", "linear", "--out", out]))
    assert "--schedule cannot be set when fine-tuning" in err
    err = error_of(capsys, main(["finetune", "--data", "digits", "--out", out]))
    assert "--from MODEL" in err
    with pytest.raises(SystemExit):  # finetune has no flag for them at all
        main(["finetune", "--from", str(trained_model), "--model", "small"])
    assert not (tmp_path / "ft").exists()


def test_a_class_conditional_model_needs_labelled_data(tmp_path, conditional_model, capsys):
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), 40 * i).save(flat / f"{i}.png")
    out = str(tmp_path / "x")
    err = error_of(capsys, finetune("--from", str(conditional_model), "--data", str(flat), "--out", out))
    assert "is class-conditional (10 classes)" in err and "has no labels" in err


def test_a_tracker_that_is_not_installed(tmp_path, trained_model, capsys):
    from accelerate.utils import is_tensorboard_available

    if is_tensorboard_available():
        pytest.skip("tensorboard is installed")
    err = error_of(capsys, finetune("--from", str(trained_model), "--data", "digits", "--log-with", "tensorboard",
                                    "--out", str(tmp_path / "ft")))
    assert "--log-with tensorboard needs the tensorboard package" in err and not (tmp_path / "ft").exists()


@pytest.mark.filterwarnings("ignore:`log_with=tensorboard` was passed")
def test_metrics_reach_the_trackers_through_accelerate(tmp_path, monkeypatch):
    """--log-with hands accelerate the tracker's name, the run's settings and each metrics row."""
    from accelerate import Accelerator

    from conftest import tiny_config
    from difflab.training import trainer

    calls = []
    monkeypatch.setattr(trainer, "check_tracker", lambda name: None)  # none is installed here
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, name, config, init_kwargs: calls.append(
        ("init", name, config["optim.lr"], init_kwargs["wandb"]["name"])))
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step: calls.append(("log", step, sorted(values))))
    monkeypatch.setattr(Accelerator, "end_training", lambda self: calls.append(("end",)))
    trainer.train(tiny_config(steps=4, log_every=2, log_with="tensorboard"), tmp_path / "run")
    columns = ["epoch", "images_per_s", "loss", "lr", "seconds"]
    assert calls == [("init", "difflab", 1e-3, "run"), ("log", 2, columns), ("log", 4, columns), ("end",)]


def test_the_card_links_a_hub_base_model(trained_model):
    from difflab.storage.card import model_card
    from difflab.storage.folder import load_model

    model = load_model(trained_model)
    model.info.base_model = "google/ddpm-celebahq-256"
    card = model_card(model, "runs/x/model")
    front_matter = card.split("---")[1]
    assert "base_model: google/ddpm-celebahq-256" in front_matter
    assert "fine-tuned from `google/ddpm-celebahq-256`" in card
    model.info.base_model = str(trained_model)  # a local folder is named in the text, not linked
    assert "base_model:" not in model_card(model, "runs/x/model").split("---")[1]


def test_a_class_conditional_model_is_fine_tuned_as_one(tmp_path, conditional_model, labelled_folder, capsys):
    from difflab.storage.folder import load_model

    out = tmp_path / "ft"
    assert finetune("--from", str(conditional_model), "--data", "digits", "--split", "test", "--out", str(out)) == 0
    tuned = load_model(out)
    assert tuned.class_names == [str(i) for i in range(10)] and tuned.info.class_method == "embedding"
    assert load_config(out / "config.toml").model.conditioning == "class"
    err = error_of(capsys, finetune("--from", str(conditional_model), "--data", str(labelled_folder),
                                    "--out", str(tmp_path / "other")))
    assert "has 10 classes and" in err and "has 2" in err
