"""CLIP image embeddings as an alternative feature space for the Fréchet distance."""

from __future__ import annotations

import torch

from difflab.models.clip import load_clip


class ClipFeatures:
    """Image embeddings of a transformers `CLIPModel` from a local folder (or a Hub id when online)."""

    def __init__(self, source: str):
        self.scorer = load_clip(source)
        self.name = f"clip:{source}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """`images` in [-1, 1], grey or RGB -> [N, D] embeddings."""
        return torch.cat([self.scorer.embed_images(chunk) for chunk in images.split(batch_size)])
