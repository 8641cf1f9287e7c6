"""The images a generation starts from or is conditioned on — img2img's image, inpainting's mask, a
depth map, the upscaler's low-resolution image — read through the hardened decoder and prepared with
diffusers' own `VaeImageProcessor`, so that difflab's inputs are exactly the pipelines' inputs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difflab.errors import InputError

log = logging.getLogger("difflab")
ImageLike = str | Path | Image.Image | torch.Tensor | np.ndarray


def read_image(source: ImageLike, what: str) -> Image.Image:
    """A PIL image from a path (through the hardened decoder), a PIL image, or an array/tensor in
    [0, 1] ([C, H, W] or [H, W, C] / [H, W])."""
    from difflab.data.decode import UnreadableImage, open_image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, Path)):
        try:
            return open_image(source)
        except UnreadableImage as e:
            raise InputError(f"cannot read the {what} {str(source)!r} ({e}); give a PNG or JPEG file") from None
    array = source.detach().cpu().float().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def check_size(width: int, height: int, factor: int, what: str = "the image size",
               step: str = "the VAE's downscaling factor") -> None:
    """Sides must be positive multiples of `factor` (what it is: `step`); the error names the nearest that are."""
    for name, side in (("width", width), ("height", height)):
        if side >= factor and side % factor == 0:
            continue
        if side < 1:
            raise InputError(f"{what} {width}×{height} does not fit: the {name} must be a positive number of pixels "
                             f"(a multiple of {factor})")
        below = side // factor * factor
        nearest = f"{below} or {below + factor}" if below >= factor else f"{factor}"
        raise InputError(f"{what} {width}×{height} does not fit: the {name} {side} must be a multiple of {factor} "
                         f"({step}); nearest that work: {nearest}")


def image_tensor(image: Image.Image, width: int, height: int, channels: int = 3,
                 resample: str = "lanczos") -> torch.Tensor:
    """[1, C, H, W] in [-1, 1], resized as diffusers' pipelines resize (the upscaler: bicubic)."""
    from diffusers.image_processor import VaeImageProcessor

    image = image.convert("RGB" if channels == 3 else "L")
    pixels = VaeImageProcessor(vae_scale_factor=1, resample=resample).preprocess(image, height=height, width=width)
    return pixels[:, :channels]


def mask_tensor(mask: Image.Image, image: Image.Image | None, width: int, height: int) -> torch.Tensor:
    """[1, 1, H, W] in {0, 1}, 1 where the image is repainted. A mask of another size is resized when
    its shape matches the image's (with a notice), refused otherwise."""
    from diffusers.image_processor import VaeImageProcessor

    if image is not None and mask.size != image.size:
        (mw, mh), (iw, ih) = mask.size, image.size
        if abs(mw / mh - iw / ih) > 0.01:
            raise InputError(f"the mask is {mw}×{mh} but the image is {iw}×{ih}: their shapes differ; give a mask "
                             "the size of the image (white where it should be repainted)")
        log.info("the mask is %d×%d and the image %d×%d: the mask is resized to fit", mw, mh, iw, ih)
    processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    return processor.preprocess(mask, height=height, width=width)


def depth_tensor(depth: ImageLike) -> torch.Tensor:
    """A depth map [1, H, W] (float; depth-to-image rescales it to [-1, 1] itself)."""
    if isinstance(depth, torch.Tensor) and depth.ndim in (2, 3) and depth.is_floating_point():
        return (depth if depth.ndim == 3 else depth[None]).float()
    image = read_image(depth, "depth map")
    grey = image.convert("F") if image.mode.startswith(("I", "F")) else image.convert("L")  # 16-bit maps keep depth
    return torch.from_numpy(np.asarray(grey, dtype=np.float32).copy())[None]
