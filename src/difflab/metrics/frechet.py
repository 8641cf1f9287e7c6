"""The Fréchet distance between two sets of feature vectors (as in FID, in any feature space)."""

from __future__ import annotations

import logging

import numpy as np

from difflab.errors import DataError

log = logging.getLogger("difflab")

# Added to the covariances' diagonals (relative to their mean variance) when they are singular.
RIDGE = 1e-6


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(Σa Σb)^½) for features a [N, D] and b [M, D].
    Tr((Σa Σb)^½) is computed as the sum of square roots of the eigenvalues of Σa^½ Σb Σa^½,
    which is symmetric, so it stays real and stable where `sqrtm` of Σa Σb may not.

    A covariance needs more than D vectors to be full rank: with fewer (a tiny data set, a small -n)
    a small ridge keeps the arithmetic sound, and a warning says the figure is only indicative and
    how many would be needed. Fewer than 2 vectors in a set have no covariance at all: an error."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    dim = a.shape[1]
    if min(len(a), len(b)) < 2:
        raise DataError(f"the Fréchet distance needs at least 2 images in each set, and more than {dim} for a "
                        f"reliable figure (got {len(a)} and {len(b)}): generate more with -n, or use data with "
                        "more held-out images")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError("the features of some images are not finite numbers, so their Fréchet distance cannot be "
                        "computed; the model's images may be broken (NaN)")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    if min(len(a), len(b)) <= dim:
        log.warning("the Fréchet distance compares %d-dimensional features, and %d and %d images cannot fill "
                    "their covariance: the figure is only indicative; use at least %d images in each set",
                    dim, len(a), len(b), dim + 1)
        ridge = RIDGE * max((np.trace(cov_a) + np.trace(cov_b)) / (2 * dim), 1e-12) * np.eye(dim)
        cov_a, cov_b = cov_a + ridge, cov_b + ridge
    root_a = _psd_sqrt(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return max(0.0, float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
