"""Same seed, same image: randomness comes from explicit generators made on the CPU, one per image."""

from __future__ import annotations

import torch


def image_generators(seed: int, count: int, start: int = 0) -> list[torch.Generator]:
    """One CPU generator per image: image i of a request uses seed + i, whatever the batching."""
    return [torch.Generator().manual_seed(seed + start + i) for i in range(count)]
