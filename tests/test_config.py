"""Config files and flags: one declaration per setting, TOML round trips, clear errors."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from conftest import tiny_config
from difflab.config import (
    RunConfig,
    ScratchConfig,
    TrainConfig,
    add_config_flags,
    apply_flags,
    differences,
    dumps_config,
    load_config,
    settings_marked,
)
from difflab.diffusion.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS
from difflab.errors import ConfigError
from difflab.models.model import DEFAULT_CFG_SCALE


def parse(*flags):
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return parser.parse_args(list(flags))


def test_a_saved_config_loads_back_equal(tmp_path):
    config = tiny_config(steps=7)
    config.data.flip = True
    (tmp_path / "c.toml").write_text(dumps_config(config))
    assert load_config(tmp_path / "c.toml") == config


def test_flags_override_only_what_they_name():
    config = apply_flags(tiny_config(), parse("--lr", "0.01", "--data", "mnist:x", "--flip", "--minutes", "3"))
    assert config.optim.lr == 0.01 and config.data.spec == "mnist:x" and config.data.flip is True
    assert config.run.minutes == 3.0 and config.optim.batch_size == 16  # untouched


def test_bad_config_files(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate' in \\[optim\\]; known: lr,"):
        load_config(path)
    path.write_text("[optimizer]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match="unknown section \\[optimizer\\]"):
        load_config(path)
    path.write_text('[optim]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match="lr must be float, not 'fast'"):
        load_config(path)
    path.write_text("[optim\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("flags,message", [
    (["--schedule", "quadratic"], "--schedule 'quadratic' is not an option; choose one of: linear, scaled_linear"),
    (["--sample-sampler", "fast"], "--sample-sampler 'fast' is not an option"),
    (["--lr", "0"], "--lr must be greater than 0"),
    (["--steps", "-3"], "--steps must be greater than 0"),
    (["--ema-decay", "1.5"], "--ema-decay must be in"),
    (["--memory-limit-mb", "-1"], r"^--memory-limit-mb must be 0 or more \(got -1\)$"),
    (["--cond-dropout", "1"], r"^--cond-dropout must be in \[0, 1\) \(got 1.0\)$"),
    (["--sample-cfg-scale", "-0.5"], "--sample-cfg-scale must be 0 or more"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be greater than 0"),
    (["--image-size", "0"], "--image-size must be greater than 0"),
    (["--timestep-shift", "0"], r"^--timestep-shift must be greater than 0 \(got 0.0\)$"),
    (["--vae-detail-weight", "-1"], r"^--vae-detail-weight must be 0 or more \(got -1.0\)$"),
])
def test_bad_values_are_named(flags, message):
    with pytest.raises(ConfigError, match=message if message.startswith("^") else message.replace("[", "\\[")):
        apply_flags(TrainConfig(), parse(*flags)).validate()


def test_the_scratch_config_checks_the_shared_declarations():
    config = ScratchConfig()
    config.run.sample_count = 0
    with pytest.raises(ConfigError, match=r"^--sample-count must be greater than 0 \(got 0\)$"):
        config.validate()
    config.run.sample_count, config.run.minutes = 4, -1.0
    with pytest.raises(ConfigError, match=r"^--minutes must be greater than 0"):
        config.validate()


def test_what_a_resumed_run_may_change_is_declared_with_each_setting():
    assert settings_marked(TrainConfig, "resumable") == {
        "data": {"memory_limit_mb"},
        "model": {"allow_pickle"},
        "optim": {"lr", "warmup_steps", "clip_grad", "gradient_checkpointing"},  # the same steps, less memory
        "vae": {"steps", "minutes"},
        "run": {f.name for f in dataclasses.fields(RunConfig)} - {"seed"},
    }
    longer = tiny_config(steps=10)
    longer.optim.lr, longer.run.device = 0.5, "cpu"
    assert differences(tiny_config(steps=6), longer) == []
    other = tiny_config(steps=6)
    other.run.seed, other.optim.batch_size = 1, 5
    assert differences(tiny_config(steps=6), other) == ["[optim] batch_size = 16 (saved) vs 5 (now)",
                                                        "[run] seed = 0 (saved) vs 1 (now)"]


def test_what_a_pretrained_model_decides_is_declared_with_each_setting():
    assert settings_marked(TrainConfig, "set_by_base") == {
        "data": {"image_size", "channels"},
        "model": {"preset", "schedule", "prediction", "timesteps", "conditioning", "class_method", "class_embed_dim"},
        "optim": set(), "vae": set(), "run": set(),
    }


def test_sampler_defaults_are_the_samplers_own():
    run = RunConfig()
    assert (run.sample_sampler, run.sample_steps) == (DEFAULT_SAMPLER, DEFAULT_STEPS)
    assert run.sample_cfg_scale is None  # the model kind's: DEFAULT_CFG_SCALE for class models, 7.5 for text
    help_ = dataclasses.fields(RunConfig)[[f.name for f in dataclasses.fields(RunConfig)].index("sample_cfg_scale")]
    assert f"default {DEFAULT_CFG_SCALE} for class models" in help_.metadata["help"]
