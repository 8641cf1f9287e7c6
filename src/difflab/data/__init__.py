"""Open image data by spec: `open_dataset("digits")`, a folder path, `mnist:PATH`, `shapes`, ...

Every source decodes into an `ImageDataset` of uint8 tensors at the requested size and channels,
except image folders too large for memory, which become a `StreamedImages` that decodes from disk.
Both carry labels and captions where the data has them (`has_labels`, `has_captions`), and their
batches hold `images`, and `labels` and `captions` (a list of strings) when there are some.
"""

from __future__ import annotations

import logging
from pathlib import Path

from difflab.data.batch_stream import BatchStream
from difflab.data.dataset import ImageDataset, match_channels, resize_uint8
from difflab.data.folder import DEFAULT_MEMORY_LIMIT_MB
from difflab.data.streaming import StreamedImages
from difflab.errors import DataError
from difflab.layout import is_hub_id

log = logging.getLogger("difflab")

SPLITS = ("train", "test", "all")
DATA_SPEC_HELP = (
    "a folder of images (labels from sub-folder names; captions from metadata.jsonl or IMAGE.txt), digits, "
    "shapes[:N] (captioned shapes), mnist:PATH, fashion-mnist:PATH, imagefolder:PATH, or a Hugging Face dataset "
    "id (owner/name)"
)
NATIVE_SIZE = {"digits": 16}  # default training size where the source's own size is not the best one

__all__ = ["ImageDataset", "StreamedImages", "BatchStream", "open_dataset", "DATA_SPEC_HELP"]


def open_dataset(spec: str, image_size: int | None = None, channels: int | None = None,
                 split: str = "train", strict: bool = False,
                 memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB, *, caption_column: str | None = None,
                 caption_template: str | None = None) -> ImageDataset | StreamedImages:
    """Images from `spec` as a uint8 [N, C, size, size] tensor (with labels and captions where the source
    has them); a folder whose decoded images would take more than `memory_limit_mb` is read from disk
    instead. `caption_column`: the metadata or dataset column holding captions (default: text or
    caption); `caption_template`: captions for labelled data, such as "a photo of a {label}"."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    data = _open(spec, image_size, channels, split, strict, memory_limit_mb, caption_column)
    if caption_template is not None:
        data.captions = _templated(data, caption_template, spec)
    return data


def _templated(data, template: str, spec: str) -> list[str]:
    from difflab.data.captions import template_captions

    if not data.has_labels:
        raise DataError(f"--caption-template needs labelled data, and {spec} has no labels "
                        "(put each class's images in its own sub-folder)")
    if data.has_captions:
        log.info("captions of %s come from the caption template %r, not from the data's own", spec, template)
    return template_captions(template, data.labels.tolist(), data.class_names)


def _open(spec: str, image_size: int | None, channels: int | None, split: str, strict: bool,
          memory_limit_mb: int, caption_column: str | None) -> ImageDataset | StreamedImages:
    kind, _, arg = spec.partition(":")
    is_folder = Path(spec).expanduser().is_dir()
    is_hub = kind in ("imagefolder", "hf") and bool(arg) or is_hub_id(spec)
    if caption_column is not None and not (is_folder or is_hub):
        raise DataError(f"--caption-column is for folders with metadata files and Hugging Face datasets; "
                        f"{spec} has no caption columns")
    if kind == "shapes":
        from difflab.data.shapes import load_shapes

        return load_shapes(arg, image_size, channels, split)
    if spec == "digits":
        from difflab.data.builtin import load_digits

        data = load_digits(split)
    elif kind in ("mnist", "fashion-mnist") and arg:
        from difflab.data.idx import load_idx_dataset

        data = load_idx_dataset(kind, arg, split)
    elif is_folder:
        from difflab.data.folder import load_folder

        return load_folder(spec, image_size, channels, split, strict, memory_limit_mb,  # decoded at the size asked
                           caption_column)
    elif is_hub:
        from difflab.data.hub import load_hub_dataset

        return load_hub_dataset(spec, image_size, channels, split, caption_column, strict)
    elif Path(spec).expanduser().exists():  # a file: an image, a config, an archive, an idx file
        raise DataError(f"{spec} is a file, not a folder of images; give the folder that holds it, or mnist:FOLDER "
                        "for MNIST's idx files")
    elif Path(spec).suffix or "/" in spec or "\\" in spec:
        raise DataError(f"data folder {spec} does not exist")
    else:
        raise DataError(f"unknown data spec {spec!r}; use {DATA_SPEC_HELP}")

    data.images = resize_uint8(data.images, image_size or NATIVE_SIZE.get(spec, data.image_size))
    data.images = match_channels(data.images, channels or data.channels)
    return data


