"""CLIP as a differentiable scorer: image and text embeddings of a transformers `CLIPModel`.

Preprocessing is done with torch ops (resize, then normalise with the model's own mean and std), so
gradients flow from an embedding back to the pixels: guidance needs that, and the CLIP feature
space of `difflab eval` uses the same code without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflab.errors import GuidanceError, ModelError

# OpenAI CLIP's normalisation, used when a folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(output) -> torch.Tensor:
    """transformers returns a tensor, or (in newer versions) an output object holding it."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """A CLIP model, its tokenizer (None if the folder has none) and its input normalisation."""

    def __init__(self, model, tokenizer, mean=CLIP_MEAN, std=CLIP_STD, name: str = "clip"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.size = model.config.vision_config.image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> ClipScorer:
        self.model.to(device)
        return self

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """`images` in [-1, 1], grey or RGB, any size -> [N, D] embeddings (differentiable)."""
        x = (images.expand(-1, 3, -1, -1) + 1) / 2
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        mean, std = self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)
        return _features(self.model.get_image_features(pixel_values=((x - mean) / std).to(self.device)))

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> [N, D] embeddings."""
        if self.tokenizer is None:
            raise GuidanceError(f"the CLIP model {self.name!r} has no tokenizer, so it cannot read a text prompt; "
                                "give a folder saved with both CLIPModel and CLIPTokenizer")
        limit = self.model.config.text_config.max_position_embeddings
        for prompt in prompts:
            length = len(self.tokenizer(prompt)["input_ids"])
            if length > limit:
                shown = prompt if len(prompt) <= 40 else prompt[:40] + "..."
                raise GuidanceError(f"the prompt {shown!r} is {length} tokens; this CLIP model reads at most "
                                    f"{limit}: shorten it")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=limit, return_tensors="pt")
        return _features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                      attention_mask=tokens["attention_mask"].to(self.device)))


def load_clip(path_or_id: str, device=None) -> ClipScorer:
    """A CLIP model from a local folder (transformers `CLIPModel.save_pretrained`, with its tokenizer
    and preprocessor config if any), or a Hub id while online."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(path_or_id)
    except Exception as e:  # the loading boundary: any failure is the folder's, and said in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load a CLIP model from {path_or_id!r} ({reason[:200]}); give a folder saved with "
                         "transformers' CLIPModel.save_pretrained, or a Hub id while online") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    except Exception:  # an image-only folder: text prompts will say so when used
        tokenizer = None
    try:
        processor = CLIPImageProcessor.from_pretrained(path_or_id)
        mean, std = processor.image_mean, processor.image_std
    except Exception:
        mean, std = CLIP_MEAN, CLIP_STD
    scorer = ClipScorer(model, tokenizer, mean, std, name=str(path_or_id))
    return scorer.to(device) if device is not None else scorer
