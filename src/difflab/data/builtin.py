"""Data that ships with difflab's dependencies, for the quick start and the tests."""

from __future__ import annotations

import numpy as np
import torch

from difflab.data.dataset import ImageDataset, split_indices


def load_digits(split: str) -> ImageDataset:
    """scikit-learn's bundled 1,797 handwritten digits (8x8, 17 grey levels), labels 0-9."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.round(bunch.images / 16.0 * 255.0).astype(np.uint8)[:, None]
    index = split_indices(len(images), split)
    return ImageDataset(
        torch.from_numpy(images)[index],
        torch.from_numpy(bunch.target.astype(np.int64))[index],
        [str(d) for d in range(10)],
        "digits",
    )
