"""CLIP image embeddings as an alternative feature space for the Fréchet distance."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflab.errors import ModelError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipFeatures:
    """Image embeddings of a transformers `CLIPModel` from a local folder (or a Hub id when online)."""

    def __init__(self, source: str):
        from transformers import CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(source).eval()
        except (OSError, ValueError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelError(f"cannot load a CLIP model from {source!r} ({reason}); give a folder saved with "
                             "transformers' CLIPModel.save_pretrained, or a Hub id while online") from None
        self.size = self.model.config.vision_config.image_size
        self.name = f"clip:{source}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """`images` in [-1, 1], grey or RGB -> [N, D] embeddings."""
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        out = []
        for chunk in images.split(batch_size):
            x = (chunk.expand(-1, 3, -1, -1) + 1) / 2
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
            output = self.model.get_image_features(pixel_values=(x - mean) / std)
            out.append(getattr(output, "pooler_output", output))
        return torch.cat(out)
