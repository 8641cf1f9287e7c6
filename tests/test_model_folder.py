"""Model folders: the diffusers layout, the model card, other pipelines, and bad folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from difflab.errors import ModelError
from difflab.storage.folder import load_model


def test_the_saved_folder_is_a_diffusers_pipeline_with_a_card(trained_model):
    index = json.loads((trained_model / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert (trained_model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    card = (trained_model / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers")
    assert "`digits`" in card and "20 optimizer steps" in card and "DDPMPipeline.from_pretrained" in card
    assert "[optim]" in card  # the run's settings
    info = json.loads((trained_model / "difflab.json").read_text())
    assert info["image_size"] == 8 and info["channels"] == 1 and info["training"]["steps"] == 20


def test_the_training_record_is_typed_and_reads_older_files(trained_model, tmp_path):
    from difflab.models.model import ModelInfo, TrainingRecord

    info = load_model(trained_model).info
    assert isinstance(info.training, TrainingRecord) and info.training.steps == 20 and info.training.images > 0
    written = json.loads((trained_model / "difflab.json").read_text())
    assert info.to_json() == written  # read and written back: the same file
    # an older difflab.json: a plain dict with a key this version does not know, and no format fields
    old = {"image_size": 8, "channels": 1, "data": "digits",
           "training": {"steps": 7, "lr": 0.001, "preset": "tiny", "ema_decay": 0.999, "made_by": "difflab 0.1"}}
    read = ModelInfo.from_json(old)
    assert (read.training.steps, read.training.lr, read.training.preset) == (7, 0.001, "tiny")
    assert read.training.others == {"made_by": "difflab 0.1"} and read.training.vae is None
    assert read.to_json()["training"] == old["training"]  # nothing lost, nothing added
    assert ModelInfo.from_json({"image_size": 8, "channels": 1}).training == TrainingRecord()
    assert ModelInfo.from_json({"image_size": 8, "channels": 1, "training": None}).training.to_json() == {}


def test_a_run_folder_loads_its_model(trained_model):
    model = load_model(trained_model.parent)
    assert model.info.image_size == 8 and model.prediction == "v"


def test_a_plain_ddim_pipeline_folder_from_elsewhere(tmp_path, trained_model):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(trained_model / "unet")
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "ddim")
    model = load_model(tmp_path / "ddim")
    assert model.info.image_size == 8 and model.info.channels == 1 and model.info.data == "(unknown)"


def copy_model(trained_model, tmp_path):
    return shutil.copytree(trained_model, tmp_path / "model")


def test_missing_folder_and_hub_id_offline(tmp_path):
    with pytest.raises(ModelError, match="model folder .*nothing does not exist"):
        load_model(tmp_path / "nothing")
    with pytest.raises(ModelError, match="neither a folder here nor a model that could be fetched from the Hugging"):
        load_model("nobody/no-such-model")


def test_stable_diffusion_and_other_pipelines_are_named(tmp_path, trained_model):
    folder = copy_model(trained_model, tmp_path)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelError, match="is a StableDiffusionPipeline folder without its vae, text_encoder, "
                                         "tokenizer sub-folders; the model folder is incomplete"):
        load_model(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDMPipeline"}))
    with pytest.raises(ModelError, match="holds a AudioLDMPipeline"):
        load_model(folder)


def test_a_folder_without_a_unet(tmp_path, trained_model):
    folder = copy_model(trained_model, tmp_path)
    shutil.rmtree(folder / "unet")
    with pytest.raises(ModelError, match="has no UNet"):
        load_model(folder)


def test_damaged_weights(tmp_path, trained_model):
    folder = copy_model(trained_model, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match="diffusion_pytorch_model.safetensors is damaged: it is not a complete"):
        load_model(folder)


def test_pickled_weights_need_an_explicit_opt_in(tmp_path, trained_model):
    folder = copy_model(trained_model, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelError, match=r"is a pickle.*--allow-pickle.*weights_only=True"):
        load_model(folder)
    model = load_model(folder, allow_pickle=True)
    reference = load_model(trained_model)
    pairs = zip(model.unet.state_dict().values(), reference.unet.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
