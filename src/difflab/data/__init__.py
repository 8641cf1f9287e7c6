"""Open image data by spec: `open_dataset("digits")`, a folder path, `mnist:PATH`, ...

Every source decodes into an `ImageDataset` of uint8 tensors at the requested size and channels,
except image folders too large for memory, which become a `StreamedImages` that decodes from disk.
"""

from __future__ import annotations

from pathlib import Path

from difflab.config import DATA_SPEC_HELP as SPEC_HELP
from difflab.config import DEFAULT_MEMORY_LIMIT_MB
from difflab.data.dataset import ImageDataset, match_channels, resize_uint8
from difflab.data.stream import BatchStream
from difflab.data.streaming import StreamedImages
from difflab.errors import DataError

SPLITS = ("train", "test", "all")
NATIVE_SIZE = {"digits": 16}  # default training size where the source's own size is not the best one

__all__ = ["ImageDataset", "StreamedImages", "BatchStream", "open_dataset", "SPEC_HELP"]


def open_dataset(spec: str, image_size: int | None = None, channels: int | None = None,
                 split: str = "train", strict: bool = False,
                 memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB) -> ImageDataset | StreamedImages:
    """Images from `spec` as a uint8 [N, C, size, size] tensor (with labels where the source has them);
    a folder whose decoded images would take more than `memory_limit_mb` is read from disk instead."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    kind, _, arg = spec.partition(":")
    if spec == "digits":
        from difflab.data.builtin import load_digits

        data = load_digits(split)
    elif kind in ("mnist", "fashion-mnist") and arg:
        from difflab.data.idx import load_idx_dataset

        data = load_idx_dataset(kind, arg, split)
    elif Path(spec).expanduser().is_dir():
        from difflab.data.folder import load_folder

        return load_folder(spec, image_size, channels, split, strict, memory_limit_mb)  # decoded at the size asked
    elif kind in ("imagefolder", "hf") and arg or _looks_like_hub_id(spec):
        from difflab.data.hub import load_hub_dataset

        return load_hub_dataset(spec, image_size, channels, split)
    elif Path(spec).expanduser().exists():  # a file: an image, a config, an archive, an idx file
        raise DataError(f"{spec} is a file, not a folder of images; give the folder that holds it, or mnist:FOLDER "
                        "for MNIST's idx files")
    elif Path(spec).suffix or "/" in spec or "\\" in spec:
        raise DataError(f"data folder {spec} does not exist")
    else:
        raise DataError(f"unknown data spec {spec!r}; use {SPEC_HELP}")

    data.images = resize_uint8(data.images, image_size or NATIVE_SIZE.get(spec, data.image_size))
    data.images = match_channels(data.images, channels or data.channels)
    return data


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))
