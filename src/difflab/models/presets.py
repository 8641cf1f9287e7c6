"""Named UNet presets, built as diffusers `UNet2DModel`s for any image size and channel count."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from difflab.errors import ModelError
from difflab.files import read_json_object


@dataclass(frozen=True)
class Preset:
    channels: tuple[int, ...]    # feature channels at each resolution, highest first
    attention: tuple[bool, ...]  # self-attention at that resolution
    layers_per_block: int
    norm_groups: int = 32
    mid_attention: bool = True
    about: str = ""

    def unet_config(self) -> dict:
        down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in self.attention]
        up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention)]
        return {
            "block_out_channels": list(self.channels),
            "down_block_types": down,
            "up_block_types": up,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_groups,
            "add_attention": self.mid_attention,
        }


PRESETS = {
    "tiny": Preset((16, 32), (False, False), 1, norm_groups=8, mid_attention=False,
                   about="for tests: 0.16 M parameters"),
    "small": Preset((32, 64, 64), (False, False, False), 1, mid_attention=False,
                    about="attention-free, for CPU work: learns MNIST-sized data in minutes (1.0 M parameters)"),
    "medium": Preset((64, 128, 256, 256), (False, False, True, True), 2,
                     about="for GPU work on 32-64 px images, attention at the two lowest resolutions"),
    "course": Preset((64, 128, 128, 256), (False, False, True, True), 2,
                     about="the UNet of the Hugging Face course, unit 1"),
}


def levels(config: dict) -> int:
    return len(config["block_out_channels"])


def check_image_size(config: dict, image_size: int, name: str) -> None:
    """Each level below the first halves the image, so the size must divide by 2**(levels-1)."""
    factor = 2 ** (levels(config) - 1)
    if image_size % factor == 0 and image_size >= factor:
        return
    below = (image_size // factor) * factor
    above = below + factor
    nearest = f"{below} and {above}" if below >= factor else f"{above}"
    raise ModelError(
        f"image size {image_size} does not fit the {name} UNet ({levels(config)} levels halve it "
        f"{levels(config) - 1} times, so it must be a multiple of {factor}): nearest sizes that work: "
        f"{nearest} (use --image-size)"
    )


def unet_config(preset: str, image_size: int, in_channels: int, out_channels: int) -> dict:
    """The UNet2DModel config for a preset name or a diffusers UNet config JSON file."""
    if preset in PRESETS:
        config, name = PRESETS[preset].unet_config(), f"'{preset}'"
    elif preset.endswith(".json") or Path(preset).is_dir():
        path = Path(preset) / "config.json" if Path(preset).is_dir() else Path(preset)
        config = read_json_object(path, ModelError, "; give a diffusers UNet2DModel config.json")
        if "block_out_channels" not in config:
            raise ModelError(f"{path} is not a diffusers UNet2DModel config (it has no block_out_channels)")
        config, name = {k: v for k, v in config.items() if not k.startswith("_")}, str(path)
    else:
        raise ModelError(
            f"unknown model preset {preset!r}; choose one of: {', '.join(PRESETS)}, or give a UNet config.json"
        )
    check_image_size(config, image_size, name)
    return {**config, "sample_size": image_size, "in_channels": in_channels, "out_channels": out_channels}


def build_unet(preset: str, image_size: int, in_channels: int, out_channels: int | None = None, **overrides):
    from diffusers import UNet2DModel

    config = unet_config(preset, image_size, in_channels, out_channels or in_channels)
    try:
        return UNet2DModel.from_config({**config, **overrides})
    except (ValueError, TypeError, KeyError) as e:
        raise ModelError(f"cannot build a UNet from {preset}: {e}") from None
