"""Depth maps for depth-to-image: a transformers depth estimator (DPT, as Stable Diffusion 2's
depth model uses) and its image processor, loaded from a folder or Hub id, run as diffusers does."""

from __future__ import annotations

import torch

from difflab.errors import ModelError


def load_depth_estimator(spec: str, device="cpu"):
    """(model, image processor) from a local folder or a Hub id."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    try:
        model = AutoModelForDepthEstimation.from_pretrained(spec).eval().to(device)
        processor = AutoImageProcessor.from_pretrained(spec)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the depth estimator {spec} ({reason}); give a transformers depth model "
                         "folder or Hub id, such as Intel/dpt-hybrid-midas") from None
    return model, processor


@torch.no_grad()
def predict_depth(estimator, image, device) -> torch.Tensor:
    """The estimator's depth map [1, h, w] of a PIL image (nearer is larger)."""
    model, processor = estimator
    pixels = processor(images=[image.convert("RGB")], return_tensors="pt").pixel_values.to(device)
    return model(pixels.to(next(model.parameters()).dtype)).predicted_depth.float()
