"""A training step of each text preset's UNet with 32 attention heads at every level (two to four channels
each: what `small` and `quick` have) against heads of 32 channels (what `pixel` has): forward and
backward, one batch, in latent space (8×8×4, what 32-px images become) and in pixel space (32×32×3).
diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads.

    OMP_NUM_THREADS=1 taskset -c 0 python bench/attention_heads.py --repeats 5
"""

from __future__ import annotations

import argparse

import torch

from common import alternate, emit
from difflab.models.text_presets import TEXT_PRESETS

SPACES = {"latent": (8, 4), "pixel": (32, 3)}
HEAD_CHANNELS = 32


def step(unet, batch: int, side: int, channels: int):
    x = torch.randn(batch, channels, side, side)
    t = torch.randint(0, 1000, (batch,))
    text = torch.randn(batch, 8, unet.config.cross_attention_dim)

    def run():
        unet.zero_grad(set_to_none=True)
        unet(x, t, text).sample.square().mean().backward()
    return run


def main() -> None:
    from diffusers import UNet2DConditionModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["quick", "small", "pixel"])
    p.add_argument("--spaces", nargs="+", default=list(SPACES), choices=list(SPACES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rows = []
    for name in args.presets:
        preset = TEXT_PRESETS[name]
        for space in args.spaces:
            side, channels = SPACES[space]
            config = preset.unet_config(side, channels)
            wide = [max(1, c // HEAD_CHANNELS) for c in preset.unet_channels]
            unets = {"heads of 32 channels": UNet2DConditionModel.from_config({**config, "attention_head_dim": wide}),
                     "32 heads": UNet2DConditionModel.from_config({**config, "attention_head_dim": 32})}
            seconds, _ = alternate({k: step(u, args.batch, side, channels) for k, u in unets.items()},
                                   args.repeats)
            rows.append({"preset": name, "space": space, "wide_heads": wide, "batch": args.batch,
                         "seconds_per_step": {k: round(v, 3) for k, v in seconds.items()},
                         "speedup": round(seconds["32 heads"] / seconds["heads of 32 channels"], 2)})
            print(rows[-1], flush=True)
    emit({"rows": rows})


if __name__ == "__main__":
    main()
