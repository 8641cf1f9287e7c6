"""The trainer's memory check at the start of train, finetune, dreambooth and textual-inversion (issue 25,
point 4): the estimate has the run's flags, a run that will not fit the device's free memory is refused in one
line naming the flags that would make it fit, before anything is written, and --yes starts it anyway."""

from __future__ import annotations

import pytest
from PIL import Image

import tiny_sd
from difflab import memory
from difflab.cli import main
from difflab.errors import ConfigError
from difflab.storage.folder import load_model

PROMPT, CLASS_PROMPT = "a sks star", "a star"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stars")
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 80, 220)).save(folder / f"star_{i}.png")
    return folder


def dreambooth(base, instances, out, *more):
    return ["dreambooth", "--model", str(base), "--instance-data", str(instances), "--instance-prompt", PROMPT,
            "--class-prompt", CLASS_PROMPT, "--prior-preservation", "--num-class-images", "2", "--out", str(out),
            "--steps", "1", "--sample-every", "0", "--checkpoint-every", "0", "--precision", "no", *more]


def full_run_flags(base) -> dict:
    size = load_model(base).info.image_size
    return dict(height=size, width=size, batch=2, lora=False, checkpointing=False, optimizer="adamw",
                precision="no", train_text_encoder=False, prior_preservation=False)


def test_a_run_that_will_not_fit_is_refused_in_one_line_with_remedies_before_anything_is_written(
        base, instances, tmp_path, monkeypatch, capsys):
    shape = memory.ModelShape.of_folder(base)
    flags = full_run_flags(base)
    remedied = {**flags, "checkpointing": True, "optimizer": "adamw8bit", "precision": "fp16", "lora": True}
    fits_remedied = memory.estimate_training(shape, **remedied).total
    # fits only with every remedy, and the headroom a remedy leaves
    monkeypatch.setattr(memory, "free_memory", lambda device: fits_remedied / memory.REMEDY_HEADROOM)
    out = tmp_path / "run"
    code = main(dreambooth(base, instances, out))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "estimated peak memory of training" in err and "pass --yes" in err
    assert "add --gradient-checkpointing --optimizer adamw8bit --precision fp16 --lora," in err
    assert not out.exists()  # no config.toml, no class images: refused before they were made


def test_yes_starts_the_run_anyway_and_says_the_estimate(base, instances, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "free_memory", lambda device: 1000.0)
    out = tmp_path / "run"
    assert main(dreambooth(base, instances, out, "--yes")) == 0
    err = capsys.readouterr().err
    assert "estimated peak memory of training on cpu: about" in err and "; 0 MB available" in err
    assert (out / "model").is_dir()


def test_a_small_run_that_fits_is_quiet(base, instances, tmp_path, capsys):
    assert main(dreambooth(base, instances, tmp_path / "run")) == 0
    err = capsys.readouterr().err
    assert "model:" in err and "estimated peak memory" not in err  # a few MB: below SAY_MEMORY_FROM


@pytest.mark.parametrize("more,expected", [
    ((), {}),
    (("--gradient-checkpointing",), {"checkpointing": True}),
    (("--optimizer", "adafactor", "--train-text-encoder"), {"optimizer": "adafactor", "train_text_encoder": True}),
    (("--lora", "--batch-size", "3"), {"lora": True, "batch": 3}),
])
def test_the_estimate_has_the_runs_flags(base, instances, tmp_path, monkeypatch, capsys, more, expected):
    seen = {}

    def stop(shape, device, *, yes, lora_flag="--lora", **flags):
        seen.update(flags)
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(memory, "check_training_memory", stop)
    assert main(dreambooth(base, instances, tmp_path / "run", *more)) == 2
    assert "stopped by the test" in capsys.readouterr().err
    assert seen == {**full_run_flags(base), **expected}
    assert not (tmp_path / "run").exists()


def test_checkpointing_lowers_the_estimate(base):
    shape = memory.ModelShape.of_folder(base)
    flags = full_run_flags(base)
    plain = memory.estimate_training(shape, **flags)
    checkpointed = memory.estimate_training(shape, **{**flags, "checkpointing": True})
    assert checkpointed.parts["activations"] < plain.parts["activations"]
    assert checkpointed.total < plain.total


def test_textual_inversion_is_estimated_as_a_sliver_of_trained_weights(base, instances, tmp_path, monkeypatch,
                                                                        capsys):
    seen = {}

    def stop(shape, device, *, yes, lora_flag="--lora", **flags):
        seen.update(flags, yes=yes)
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(memory, "check_training_memory", stop)
    argv = ["textual-inversion", "--model", str(base), "--data", str(instances), "--token", "<star>",
            "--init-word", "star", "--out", str(tmp_path / "ti"), "--steps", "1", "--yes"]
    assert main(argv) == 2, capsys.readouterr().err
    assert seen["lora"] and not seen["train_text_encoder"] and seen["yes"]


def test_a_new_model_is_checked_once_built_at_the_datas_size(tmp_path, monkeypatch, capsys):
    seen = {}

    def stop(shape, device, *, yes, lora_flag="--lora", **flags):
        seen.update(flags, unet=shape.unet, lora_flag=lora_flag)
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(memory, "check_training_memory", stop)
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--steps", "1", "--batch-size", "8", "--out", str(out)]) == 2
    assert "stopped by the test" in capsys.readouterr().err
    assert seen["height"] == 16 and seen["batch"] == 8 and seen["unet"] > 0 and seen["lora_flag"] == "--lora-rank 4"
    assert not out.exists()
