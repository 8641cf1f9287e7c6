"""A Stable Diffusion folder's safety checker, run as its pipeline runs it: flagged images come out
black, and a warning says how many were."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("difflab")


@torch.no_grad()
def black_out_flagged(model, images: torch.Tensor) -> torch.Tensor:
    """Decoded images in [-1, 1] -> the same, with the images the checker flags set to black."""
    from diffusers.image_processor import VaeImageProcessor

    checker, processor = model.safety_checker
    parameter = next(checker.parameters())
    pictures = VaeImageProcessor().postprocess(images.float(), output_type="pil")
    clip_input = processor(pictures, return_tensors="pt").pixel_values.to(parameter.device, parameter.dtype)
    _, flagged = checker(images=images.clone(), clip_input=clip_input)
    flagged = torch.tensor([bool(f) for f in flagged], device=images.device)
    if flagged.any():
        log.warning("the model's safety checker flagged %d of %d images; they are black (--no-safety-checker "
                    "turns it off)", int(flagged.sum()), len(images))
    return torch.where(flagged[:, None, None, None], torch.full_like(images, -1.0), images)
