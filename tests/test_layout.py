"""difflab.layout answers "what is at this path" for every kind of thing difflab reads; the folders here
hold only the names it judges by (the loaders' own tests load real ones)."""

from __future__ import annotations

import json

import pytest

from difflab import layout
from difflab.errors import ModelError
from difflab.layout import Kind, expect, is_hub_id, local_model_folder, what_is_at


def touch(path, text: str = "{}"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def pipeline_folder(folder, class_name: str):
    touch(folder / layout.MODEL_INDEX, json.dumps({"_class_name": class_name}))
    return folder


def test_run_folders_finished_unfinished_and_lora(tmp_path):
    run = tmp_path / "run"
    touch(run / layout.RUN_CONFIG, "")
    assert what_is_at(run) is Kind.UNFINISHED_RUN
    pipeline_folder(run / layout.RUN_MODEL, "DDPMPipeline")
    assert what_is_at(run) is Kind.RUN
    assert local_model_folder(run) == run / layout.RUN_MODEL
    assert layout.run_of(run / layout.RUN_MODEL) == run and layout.run_of(tmp_path) is None

    lora_run = tmp_path / "lora-run"
    touch(lora_run / layout.RUN_CONFIG, "")
    touch(lora_run / layout.RUN_MODEL / layout.LORA_WEIGHTS, "")
    assert what_is_at(lora_run) is Kind.LORA_RUN
    assert what_is_at(lora_run / layout.RUN_MODEL) is Kind.LORA_FOLDER
    assert what_is_at(lora_run / layout.RUN_MODEL / layout.LORA_WEIGHTS) is Kind.LORA_FILE


def test_a_runs_vae_stage(tmp_path):
    touch(tmp_path / "run" / layout.RUN_CONFIG, "")
    stage = tmp_path / "run" / layout.VAE_STAGE
    touch(stage / layout.RUN_MODEL / "config.json", json.dumps({"block_out_channels": [8]}))
    assert what_is_at(stage) is Kind.VAE_STAGE
    with pytest.raises(ModelError, match="is the VAE stage of the run .* has not finished .* --resume$"):
        local_model_folder(stage)
    # a folder named vae outside a run is whatever it holds
    assert what_is_at(pipeline_folder(tmp_path / "other" / layout.VAE_STAGE, "DDPMPipeline")) is Kind.MODEL


@pytest.mark.parametrize(("make", "kind"), [
    (lambda f: pipeline_folder(f, "StableDiffusionPipeline"), Kind.SD_FOLDER),
    (lambda f: pipeline_folder(f, "StableDiffusionInpaintPipeline"), Kind.SD_FOLDER),
    (lambda f: pipeline_folder(f, "DDPMPipeline"), Kind.MODEL),
    (lambda f: touch(f / "unet" / "config.json"), Kind.MODEL),  # a pixel-space text model's parts
    (lambda f: touch(f / "config.json", json.dumps({"block_out_channels": [32, 64]})), Kind.MODEL),  # a bare UNet
    (lambda f: touch(f / layout.SCRATCH_INFO_FILE), Kind.SCRATCH_MODEL),
    (lambda f: touch(f / layout.LORA_WEIGHTS, ""), Kind.LORA_FOLDER),
    (lambda f: touch(f / "notes.txt", ""), Kind.FOLDER),
    (lambda f: touch(f / "config.json", "not json"), Kind.FOLDER),  # damaged, so nothing of ours
])
def test_model_folders_by_what_they_hold(tmp_path, make, kind):
    folder = tmp_path / "m"
    make(folder)
    assert what_is_at(folder) is kind


@pytest.mark.parametrize(("name", "kind"), [
    ("model.safetensors", Kind.SINGLE_FILE), ("v1-5.ckpt", Kind.SINGLE_FILE), ("old.PKL", Kind.SINGLE_FILE),
    (layout.LORA_WEIGHTS, Kind.LORA_FILE), (layout.LORA_PICKLE, Kind.LORA_FILE), ("photo.png", Kind.FILE),
])
def test_files_by_their_names(tmp_path, name, kind):
    assert what_is_at(touch(tmp_path / name, "")) is kind


def test_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("CompVis/stable-diffusion-v1-4", "me/sks-dog", "owner/model.v2"):
        assert is_hub_id(spec) and what_is_at(spec) is Kind.HUB_ID
    for spec in ("runs/x.safetensors", "./a/b", "~/a", "/abs", "a/b/c", "a b/c", "a/../b", "one", "", None, 3):
        assert not is_hub_id(spec)
    assert what_is_at("runs/missing.safetensors") is Kind.NOTHING
    pipeline_folder(tmp_path / "owner" / "name", "DDPMPipeline")
    assert not is_hub_id("owner/name") and what_is_at("owner/name") is Kind.MODEL  # a folder here wins


def test_expect_names_what_was_found_and_what_was_wanted(tmp_path):
    touch(tmp_path / "notes.txt", "")
    wanted = (*layout.MODEL_FOLDERS, *layout.RUNS, Kind.HUB_ID)
    assert expect(pipeline_folder(tmp_path / "m", "StableDiffusionPipeline"), wanted) is Kind.SD_FOLDER
    with pytest.raises(ModelError) as e:
        expect(tmp_path, wanted, flag="--model")
    assert str(e.value) == (f"--model {tmp_path} is a folder, not a Stable Diffusion folder, a model folder, a "
                            "from-scratch teaching model folder, a run folder, a LoRA run folder, a run folder "
                            "with no model/ yet or a Hugging Face Hub id")
    with pytest.raises(ModelError, match=r"^--lora \S+missing does not exist; give a LoRA file "
                                         r"\(pytorch_lora_weights.safetensors\), a LoRA folder, a LoRA run folder "
                                         r"or a Hugging Face Hub id$"):
        expect(tmp_path / "missing", layout.LORAS, flag="--lora")
    touch(tmp_path / "run" / layout.RUN_CONFIG, "")
    with pytest.raises(ModelError, match="never trained a step .* difflab train --config"):
        expect(tmp_path / "run", [Kind.RUN])


def test_local_model_folder_refuses_files_and_missing_paths(tmp_path):
    with pytest.raises(ModelError, match="is a file; give the model folder that holds it"):
        local_model_folder(touch(tmp_path / "model.safetensors", ""))
    with pytest.raises(ModelError, match="does not exist"):
        local_model_folder(tmp_path / "missing")
