"""Fréchet distance, KID and statistics files against closed forms and pytorch-fid's formula."""

import numpy as np
import pytest
import scipy.stats

from ddsm_jax.eval.features import FeatureExtractor, compute_features
from ddsm_jax.eval.metrics import (
    feature_statistics,
    frechet_distance,
    frechet_distance_sqrtm,
    kernel_inception_distance,
    load_statistics,
    save_statistics,
)


def _random_covariance(rng, dim, rank=None):
    a = rng.normal(size=(dim, rank or dim))
    return a @ a.T / (rank or dim)


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_one_dimensional_and_identical():
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]),
                            np.array([[1.0]])) == pytest.approx(9 + 1)
    rng = np.random.default_rng(1)
    sigma = _random_covariance(rng, 20)
    assert frechet_distance(np.ones(20), sigma, np.ones(20), sigma) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_matches_sqrtm_for_non_commuting_covariances():
    rng = np.random.default_rng(2)
    s1, s2 = _random_covariance(rng, 64), _random_covariance(rng, 64)
    mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        frechet_distance_sqrtm(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_distance_is_stable_for_singular_covariances():
    # Fewer samples than dimensions (rank 10 in 50-d): sqrtm can go complex; ours stays exact.
    rng = np.random.default_rng(3)
    sigma = _random_covariance(rng, 50, rank=10)
    got = frechet_distance(np.zeros(50), sigma, np.zeros(50), sigma)
    assert got == pytest.approx(0, abs=1e-8)
    scaled = frechet_distance(np.zeros(50), sigma, np.zeros(50), 4 * sigma)
    # tr(S + 4S - 2*2S) = tr(S); the 40 zero eigenvalues cost some precision through their roots.
    assert scaled == pytest.approx(np.trace(sigma), rel=1e-6)


def test_feature_statistics_estimate_a_known_gaussian():
    rng = np.random.default_rng(4)
    cov = _random_covariance(rng, 4)
    samples = rng.multivariate_normal(np.arange(4.0), cov, size=200_000)
    mu, sigma = feature_statistics(samples)
    np.testing.assert_allclose(mu, np.arange(4.0), atol=0.02)
    np.testing.assert_allclose(sigma, cov, atol=0.02)
    assert frechet_distance(mu, sigma, np.arange(4.0), cov) < 1e-3


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(500, 16)), rng.normal(size=(500, 16))
    same, _ = kernel_inception_distance(x, y, num_subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 0.02 < shifted
    # Seeded: a rerun gives the same value.
    assert kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=200) == (
        kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=200))


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    # One subset holding every sample: the estimator is exactly unbiased MMD^2 on all of them.
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(30, 3)), rng.normal(loc=0.3, size=(30, 3))
    k = lambda a, b: (a @ b.T / 3 + 1) ** 3
    m = 30
    expected = ((k(x, x).sum() - np.trace(k(x, x))) / (m * (m - 1))
                + (k(y, y).sum() - np.trace(k(y, y))) / (m * (m - 1)) - 2 * k(x, y).mean())
    got, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=30)
    assert got == pytest.approx(expected, rel=1e-12) and std == 0


def test_statistics_files_round_trip_in_pytorch_fid_format(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    path = tmp_path / "stats.npz"
    save_statistics(path, mu, sigma)
    with np.load(path) as data:
        assert sorted(data.files) == ["mu", "sigma"]
    loaded = load_statistics(path)
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)


def test_statistics_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no FID statistics"):
        load_statistics(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        load_statistics(tmp_path / "other.npz")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="do not match"):
        load_statistics(tmp_path / "bad.npz")


def test_compute_features_pads_the_last_batch_and_splits_over_devices():
    # A linear "network": the features must equal the plain matmul for every image, whatever
    # the batch size (8 simulated devices; 13 images do not divide evenly).
    rng = np.random.default_rng(7)
    weight = rng.normal(size=(4 * 4 * 1, 5)).astype(np.float32)
    extractor = FeatureExtractor("linear", 5, weight,
                                 lambda w, images: images.reshape(len(images), -1) @ w)
    images = rng.uniform(-1, 1, size=(13, 4, 4, 1)).astype(np.float32)
    expected = images.reshape(13, -1) @ weight
    for batch_size in (1, 5, 64):
        got = compute_features(extractor, images, batch_size=batch_size)
        assert got.shape == (13, 5)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(compute_features(extractor, images, limit=6), expected[:6],
                               rtol=1e-5, atol=1e-5)


def test_frechet_distance_of_large_samples_from_equal_gaussians_is_small():
    rng = np.random.default_rng(8)
    a = scipy.stats.norm.rvs(size=(5000, 8), random_state=rng)
    b = scipy.stats.norm.rvs(size=(5000, 8), random_state=rng)
    assert frechet_distance(*feature_statistics(a), *feature_statistics(b)) < 0.02
