"""Fréchet distance, KID and reference statistics in pytorch-fid's `.npz` format.

These run in float64 numpy on the host: the feature statistics are small (at most 2048 x 2048)
and the matrix square root needs the precision; the features themselves come from the device.
"""

from __future__ import annotations

import chex
import numpy as np
import scipy.linalg
from etils import epath

from ddsm_jax.common_types import PathLike
from ddsm_jax.utils.files import write_atomically


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as pytorch-fid's `np.cov(rowvar=False)`)."""
    features = np.asarray(features, dtype=np.float64)
    chex.assert_rank(features, 2)
    if len(features) < 2:
        raise ValueError(f"feature statistics need at least 2 samples, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    tr((S1 S2)^(1/2)) is computed from the symmetric matrix S1^(1/2) S2 S1^(1/2), whose
    eigenvalues are those of S1 S2 but real and non-negative up to rounding: no complex
    `sqrtm`, no need for pytorch-fid's diagonal offset when the covariances are singular
    (fewer samples than feature dimensions), and the result agrees with `sqrtm` otherwise.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    dim = mu1.shape[0]
    chex.assert_shape([mu2], (dim,))
    chex.assert_shape([sigma1, sigma2], (dim, dim))
    root1 = _symmetric_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def frechet_distance_sqrtm(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                           sigma2: np.ndarray) -> float:
    """pytorch-fid's formula with `scipy.linalg.sqrtm`, kept to cross-check the one above."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, *,
                              num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al.): unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3.

    Averaged over random subsets (at most the smaller set's size), as the standard tools do;
    returns (mean, standard deviation over subsets). Seeded, so reruns agree.
    """
    features1 = np.asarray(features1, dtype=np.float64)
    features2 = np.asarray(features2, dtype=np.float64)
    chex.assert_rank([features1, features2], 2)
    chex.assert_equal_shape_suffix([features1, features2], 1)
    dim = features1.shape[1]
    m = min(subset_size, len(features1), len(features2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {len(features1)} and "
                         f"{len(features2)}")
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets)
    for i in range(num_subsets):
        x = features1[rng.choice(len(features1), m, replace=False)]
        y = features2[rng.choice(len(features2), m, replace=False)]
        k_xx = (x @ x.T / dim + 1) ** 3
        k_yy = (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        off_diagonal = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates[i] = off_diagonal - 2 * k_xy.mean()
    return float(estimates.mean()), float(estimates.std())


def save_statistics(path: PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Writes `mu`, `sigma` as pytorch-fid does, so published statistics are interchangeable."""
    write_atomically(path, lambda handle: np.savez(handle, mu=mu, sigma=sigma))


def load_statistics(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads a pytorch-fid style `.npz` (keys `mu`, `sigma`)."""
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FID statistics at {path}: compute them with "
                                f"`python -m ddsm_jax.eval.stats` or give a published .npz")
    try:
        with path.open("rb") as handle, np.load(handle) as data:
            mu, sigma = data["mu"], data["sigma"]
    except (KeyError, ValueError, OSError) as error:
        raise ValueError(f"{path} is not FID statistics (an .npz with 'mu' and 'sigma'): "
                         f"{error}") from error
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match")
    return mu, sigma
