"""Decode one image file into a square uint8 array with the requested channels.

Handles what real folders hold: grey, RGB, RGBA/LA (composited over white), palette, CMYK, 16-bit,
EXIF orientation, ICC profiles (converted to sRGB), animated files (first frame). A file that cannot
be decoded raises `UnreadableImage` with a short reason. Files are untrusted input: only the formats
that IMAGE_EXTENSIONS promise are decoded, whatever a file is named; decompression bombs, pipes,
devices and broken or looping links count as unreadable; no file's shape can make a resize explode.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
# Pillow's names for those formats (JPEG includes cameras' MPO files). No other decoder sees a file;
# some, such as EPS, would start external programs.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "GIF")
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
MAX_RESIZED_PIXELS = 1 << 24  # past this, only the centre of an image is resized (see resize_center_crop)


class UnreadableImage(Exception):
    """A file that is not a usable image; the message is the reason, for a warning."""


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, turning every failure into `UnreadableImage`."""
    _check_regular_file(path)
    Image.init()  # registers every format, so that `formats` can name them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # "corrupt EXIF data": the pixels are still good
            with Image.open(path, formats=IMAGE_FORMATS) as img:
                img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_srgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage("too many pixels (possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise UnreadableImage("not an image file (PNG, JPEG, WebP, BMP or GIF)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UnreadableImage(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    except Exception as e:  # Pillow's decoders raise many other kinds on malformed data
        raise UnreadableImage(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'cannot decode'}") from None


def _check_regular_file(path: str | Path) -> None:
    try:
        info = os.stat(path)  # follows links
    except OSError as e:
        raise UnreadableImage(e.strerror or type(e).__name__) from None  # a broken or looping link
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableImage("not a regular file")  # reading a pipe or a device could block forever


def _to_srgb(img: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile so that colours mean sRGB; leave images without one alone."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in {"RGB", "RGBA", "CMYK"}:
        return img
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode=out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return img  # a broken profile is not worth losing the image over


def is_grey(img: Image.Image) -> bool:
    """Grey by mode, or colour-mode pixels that are all grey (R = G = B), as in many PNG exports."""
    if img.mode in GREY_MODES:
        return True
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """'L' (channels=1) or 'RGB' (channels=3); transparency is composited over white."""
    if img.mode in {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}:
        img = _high_depth_to_l(img)
    if img.mode in {"P", "PA"}:
        img = img.convert("RGBA")
    if img.mode in {"RGBA", "LA", "La", "RGBa"}:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values / 257.0  # 16-bit range -> 8-bit
    elif img.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8), mode="L")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size`, then cut the centre square."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        if new[0] * new[1] > MAX_RESIZED_PIXELS:  # a very long, thin image: resizing all of it could take GBs
            box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
            return img.resize((size, size), Image.Resampling.BICUBIC, box=box)
        img = img.resize(new, Image.Resampling.BICUBIC)
        img = img.crop((left, top, left + size, top + size))
    return img


def to_array(img: Image.Image) -> np.ndarray:
    """uint8 array [channels, height, width] of an 'L' or 'RGB' image."""
    arr = np.asarray(img, dtype=np.uint8)
    # a plain (C-ordered) copy: a transposed view would carry a channels-last layout into the batches,
    # where convolutions round differently
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def image_to_array(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """uint8 array [channels, size, size]."""
    return to_array(resize_center_crop(to_mode(img, channels), size))


def read_image_array(path: str | Path, size: int, channels: int) -> np.ndarray:
    return image_to_array(open_image(path), size, channels)


def read_whole_image(path: str | Path, channels: int) -> np.ndarray:
    """uint8 array [channels, height, width] at the file's own size (a guidance reference image)."""
    return to_array(to_mode(open_image(path), channels))
