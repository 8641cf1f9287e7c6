"""CLIP score: how well images match their prompts in a CLIP model's joint embedding space,
100 · max(cos(image, text), 0) averaged over the images (the definition of Hessel et al. 2021, as
torchmetrics computes it). It needs a CLIP model (`--clip-model PATH_OR_ID`); none downloads here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def clip_score(scorer, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> float:
    """`images` in [-1, 1] [N, C, H, W], one prompt each."""
    scores = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        image = F.normalize(scorer.embed_images(images[chunk]).float(), dim=-1)
        text = F.normalize(scorer.embed_text(list(prompts[chunk])).float(), dim=-1)
        scores.append((image * text.to(image.device)).sum(-1).clamp(min=0) * 100)
    return round(torch.cat(scores).mean().item(), 4)
