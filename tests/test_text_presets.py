"""The named text-to-image sizes build the networks they describe."""

from __future__ import annotations

import pytest
import torch

from difflab.models.text_presets import TEXT_PRESETS


@pytest.mark.parametrize("name", list(TEXT_PRESETS))
def test_each_attention_level_has_the_presets_number_of_heads(name):
    from diffusers import UNet2DConditionModel

    preset = TEXT_PRESETS[name]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(preset.unet_config(32, 4))
    heads = preset.heads if isinstance(preset.heads, tuple) else (preset.heads,) * len(preset.unet_channels)
    for level, block in enumerate(unet.down_blocks):
        for attention in [m for m in block.modules() if type(m).__name__ == "Attention"]:
            assert attention.heads == heads[level], (name, level)
    assert {m.heads for m in unet.mid_block.modules() if type(m).__name__ == "Attention"} == {heads[-1]}


def test_the_pixel_presets_heads_are_32_channels_wide():
    # in pixel space attention runs on 8×8 and finer: narrow heads there cost 1.3–2.75× (docs/benchmarks.md)
    preset = TEXT_PRESETS["pixel"]
    assert [c // h for c, h in zip(preset.unet_channels, preset.heads)] == [32, 32, 32]


def test_a_pixel_space_preset_records_no_vae_unless_given_one():
    from difflab.config import TrainConfig
    from difflab.training.settings import settle_settings, trains_vae_stage

    config = TrainConfig()
    config.data.spec, config.data.image_size = "shapes:n=16", 16
    config.model.conditioning, config.model.preset = "text", "pixel"
    settled, _, _ = settle_settings(config)
    assert settled.model.vae == "none" and not trains_vae_stage(settled)
    config.model.vae = "runs/some-vae"  # a VAE given is used as given
    assert settle_settings(config)[0].model.vae == "runs/some-vae"
    config.model.vae, config.model.preset = None, "small"  # a latent preset trains its own VAE
    settled, _, _ = settle_settings(config)
    assert settled.model.vae is None and trains_vae_stage(settled)


def test_the_pixel_presets_caption_reaches_the_network_without_cross_attention():
    # pooled into the timestep embedding, as a class label is: with every cross-attention silenced, the
    # caption still changes the prediction (it would not in `small`)
    from diffusers import UNet2DConditionModel

    outputs = {}
    for name in ("pixel", "small"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(TEXT_PRESETS[name].unet_config(16, 3)).eval()
        for module in unet.modules():
            if type(module).__name__ == "Attention" and module.is_cross_attention:
                torch.nn.init.zeros_(module.to_out[0].weight)
                torch.nn.init.zeros_(module.to_out[0].bias)
        x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
        with torch.no_grad():
            a, b = (unet(x, t, torch.randn(1, 8, 128, generator=torch.Generator().manual_seed(s))).sample
                    for s in (1, 2))
        outputs[name] = (a - b).abs().max().item()
    assert outputs["pixel"] > 1e-3 and outputs["small"] < 1e-6
