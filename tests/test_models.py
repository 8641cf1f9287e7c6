"""UNet presets, size checks and configs; the noise schedules."""

from __future__ import annotations

import json

import pytest
import torch

from difflab.errors import ConfigError, ModelError
from difflab.models.presets import PRESETS, build_unet
from difflab.models.schedules import SCHEDULES, noise_scheduler


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_build_for_any_channel_count_and_run(preset, channels):
    size = 2 ** (len(PRESETS[preset].channels) - 1) * 2
    unet = build_unet(preset, size, channels)
    out = unet(torch.randn(2, channels, size, size), torch.tensor([1, 500])).sample
    assert out.shape == (2, channels, size, size)


def attention_layers(unet) -> int:
    from diffusers.models.attention_processor import Attention

    return sum(isinstance(m, Attention) for m in unet.modules())


def parameters(unet) -> int:
    return sum(p.numel() for p in unet.parameters())


@pytest.mark.parametrize("preset,millions,said", [("tiny", 0.16, "0.16 M parameters"),
                                                  ("small", 1.0, "1.0 M parameters")])
def test_the_cpu_presets_are_attention_free_and_keep_their_size(preset, millions, said):
    """What --model small promises on the CPU (docs/benchmarks.md): 1.0 M parameters, no attention
    at any resolution (attention at 14x14 and 7x7 is where the course's UNet loses its speed)."""
    for channels in (1, 3):
        unet = build_unet(preset, 28, channels)
        assert attention_layers(unet) == 0
        assert abs(parameters(unet) / 1e6 - millions) <= 0.05 * millions
    assert said in PRESETS[preset].about  # what the preset says of itself


def test_the_gpu_presets_attend_at_the_two_lowest_resolutions_only():
    for preset in ("medium", "course"):
        config = build_unet(preset, 32, 3).config
        assert list(config.down_block_types) == ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]
        assert list(config.up_block_types) == ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
    assert parameters(build_unet("medium", 32, 3)) > parameters(build_unet("course", 32, 3)) > 10e6


def test_course_preset_is_the_unit_one_unet():
    config = build_unet("course", 32, 3).config
    assert list(config.block_out_channels) == [64, 128, 128, 256] and config.layers_per_block == 2
    assert list(config.down_block_types) == ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]
    assert list(config.up_block_types) == ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]


def test_an_image_size_that_does_not_fit_names_the_nearest_that_do():
    with pytest.raises(ModelError, match=r"image size 28 .*multiple of 8.*nearest sizes that work: 24 and 32"):
        build_unet("course", 28, 1)
    with pytest.raises(ModelError, match=r"nearest sizes that work: 4\b"):
        build_unet("small", 2, 1)


def test_any_diffusers_unet_config_json(tmp_path):
    config = build_unet("tiny", 8, 1).config
    (tmp_path / "unet.json").write_text(json.dumps(dict(config)))
    unet = build_unet(str(tmp_path / "unet.json"), 16, 3)
    assert unet.config.sample_size == 16 and unet.config.in_channels == 3
    assert list(unet.config.block_out_channels) == [16, 32]


def test_bad_presets(tmp_path):
    with pytest.raises(ModelError, match="unknown model preset 'huge'; choose one of: tiny, small, medium, course"):
        build_unet("huge", 32, 3)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        build_unet(str(tmp_path / "bad.json"), 32, 3)
    (tmp_path / "other.json").write_text('{"vocab_size": 3}')
    with pytest.raises(ModelError, match="not a diffusers UNet2DModel config"):
        build_unet(str(tmp_path / "other.json"), 32, 3)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_runs_from_signal_to_noise(name):
    schedule = noise_scheduler(name)
    abar = schedule.alphas_cumprod
    assert abar[0] > 0.99 and abar[-1] < 0.01 and bool((abar[1:] <= abar[:-1]).all())
    x0, noise = torch.ones(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    t = torch.tensor([500])
    expected = abar[500].sqrt() * x0 + (1 - abar[500]).sqrt() * noise
    assert torch.allclose(schedule.add_noise(x0, noise, t), expected, atol=1e-6)


def test_cosine_is_diffusers_squaredcos_and_keeps_more_signal_midway():
    cosine, linear = noise_scheduler("cosine"), noise_scheduler("linear")
    assert cosine.config.beta_schedule == "squaredcos_cap_v2"
    assert cosine.alphas_cumprod[500] > linear.alphas_cumprod[500]


def test_unknown_schedule_or_prediction():
    with pytest.raises(ConfigError, match="unknown noise schedule 'quadratic'; choose one of: linear"):
        noise_scheduler("quadratic")
    with pytest.raises(ConfigError, match="unknown prediction type 'noise'"):
        noise_scheduler("linear", "noise")


def test_each_variant_owns_its_channels_modes_and_pipeline_parts():
    from types import SimpleNamespace

    from difflab.models.variants import VARIANTS, variant_for

    assert {key: 4 + v.extra_channels(4) for key, v in VARIANTS.items()} == {
        None: 4, "inpaint": 9, "depth": 5, "upscale": 7}
    for key, v in VARIANTS.items():
        assert variant_for(4 + v.extra_channels(4), 4, v.pipeline, "here") == key  # loading decides it back
        assert v.modes == (("txt2img", "img2img", "inpaint") if key is None else (key,))
    assert variant_for(4, 4, "StableDiffusionImg2ImgPipeline", "here") is None
    with pytest.raises(ModelError, match="takes 6 input channels, which match no known layout"):
        variant_for(6, 4, None, "here")
    model = SimpleNamespace(safety_checker=("checker", "processor"), depth_estimator=("dpt", "dpt processor"),
                            low_res_scheduler="low", max_noise_level=350)
    assert VARIANTS[None].pipeline_parts(model) == VARIANTS["inpaint"].pipeline_parts(model) == dict(
        safety_checker="checker", feature_extractor="processor", requires_safety_checker=True)
    assert VARIANTS["depth"].pipeline_parts(model) == dict(depth_estimator="dpt", feature_extractor="dpt processor")
    assert VARIANTS["upscale"].pipeline_parts(model) == dict(low_res_scheduler="low", max_noise_level=350,
                                                             safety_checker="checker", feature_extractor="processor")
    parts = VARIANTS["upscale"].conditioning_parts(2, 4, (8, 8), "cpu")
    assert parts["channels"].shape == (2, 3, 8, 8) and parts["noise_level"].shape == (2,)
    assert VARIANTS[None].conditioning_parts(2, 4, (8, 8), "cpu") == {}


def test_each_variant_has_its_own_start():
    from difflab.diffusion.modes import STARTS
    from difflab.models.variants import VARIANTS

    assert set(STARTS) == set(VARIANTS) and len(set(STARTS.values())) == len(VARIANTS)
