"""Config files and flags: one declaration per setting, TOML round trips, clear errors."""

from __future__ import annotations

import argparse

import pytest

from conftest import tiny_config
from difflab.config import TrainConfig, add_config_flags, apply_flags, dumps_config, load_config
from difflab.errors import ConfigError


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
])
def test_bad_values_are_named(flags, message):
    with pytest.raises(ConfigError, match=message.replace("[", "\\[")):
        apply_flags(TrainConfig(), parse(*flags)).validate()
