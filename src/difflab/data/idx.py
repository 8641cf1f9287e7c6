"""MNIST and Fashion-MNIST from their original idx files (gzipped or not)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from difflab.data.dataset import ImageDataset
from difflab.errors import DataError

CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
FILE_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file: two zero bytes, a type code (0x08 = uint8), the number of dimensions,
    big-endian int32 sizes, then the data."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path} is a damaged gzip file ({e}); download it again") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an idx file of bytes (wrong header); is it the right file?")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: the header promises {shape} but the file is shorter; download it again")
    return body.reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder} has no {stem} or {stem}.gz; point the spec at the folder holding the idx files")


def load_idx_dataset(kind: str, folder: str, split: str) -> ImageDataset:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"{kind}:{folder}: no such folder; give the folder that holds the {kind} idx files")
    parts = ["train", "test"] if split == "all" else [split]
    images, labels = [], []
    for part in parts:
        prefix = FILE_PREFIX[part]
        x = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{root}: the {part} images and labels do not match ({x.shape} vs {y.shape})")
        images.append(torch.from_numpy(x.copy()).unsqueeze(1))
        labels.append(torch.from_numpy(y.astype(np.int64)))
    return ImageDataset(torch.cat(images), torch.cat(labels), CLASS_NAMES[kind], f"{kind}:{folder}")
