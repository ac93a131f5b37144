"""The multi-stage strategy's timestep stages, against brute-force references."""

import numpy as np
import pytest

from ddsm_jax.configs import digits
from ddsm_jax.data.pipeline import load_dataset
from ddsm_jax.diffusion.schedules import make_betas
from ddsm_jax.strategies import stage_split
from tests.helpers import tiny_config


def _alphas_cumprod(num_timesteps=1000):
    return np.cumprod(1 - make_betas("linear", num_timesteps, 1e-4, 0.02))


def test_optimal_denoiser_equals_the_posterior_mean_summed_image_by_image():
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (7, 5)).astype(np.float32)
    x_t = rng.standard_normal((3, 5)).astype(np.float32)
    alpha_bar = 0.6
    expected = []
    for x in x_t.astype(np.float64):  # p(y | x_t) proportional to N(x_t; sqrt(abar) y, 1 - abar)
        log_w = np.array([-np.sum((x - np.sqrt(alpha_bar) * y) ** 2) / (2 * (1 - alpha_bar))
                          for y in train.astype(np.float64)])
        w = np.exp(log_w - log_w.max())
        expected.append((w / w.sum()) @ train)
    got = stage_split.optimal_denoiser(x_t, np.float32(alpha_bar), train)
    np.testing.assert_allclose(np.asarray(got), np.array(expected), atol=1e-5)


def test_at_low_noise_the_optimal_denoiser_returns_the_training_image():
    train = np.asarray(load_dataset(tiny_config().data).train[:200]).reshape(200, -1)
    alpha_bar = _alphas_cumprod()[0]
    x_t = np.sqrt(alpha_bar) * train[:4] + np.sqrt(1 - alpha_bar) * np.random.default_rng(1
          ).standard_normal(train[:4].shape)
    got = stage_split.optimal_denoiser(x_t.astype(np.float32), np.float32(alpha_bar), train)
    np.testing.assert_allclose(np.asarray(got), train[:4], atol=1e-4)


def test_best_split_finds_planted_blocks():
    blocks = [0] * 4 + [1] * 9 + [2] * 8  # three contiguous groups on a 21-point grid
    similarity = np.where(np.equal.outer(blocks, blocks), 0.9, 0.2)
    similarity += np.random.default_rng(0).uniform(0, 0.05, similarity.shape)
    assert stage_split.best_split(similarity, 3) == (4, 13)
    assert stage_split.best_split(similarity, 1) == ()
    with pytest.raises(ValueError, match="num_stages=0"):
        stage_split.best_split(similarity, 0)


def test_digits_stages_are_ordered_and_cover_every_timestep():
    train = np.asarray(load_dataset(tiny_config().data).train[:])
    boundaries = stage_split.stage_boundaries(train, _alphas_cumprod(), 3, num_pairs=64)
    assert len(boundaries) == 2 and 0 < boundaries[0] < boundaries[1] < 999
    assert boundaries == tuple(digits.get_config().multistage.boundaries)  # the config's stages
    stages = stage_split.stage_of(np.arange(1000), boundaries)
    assert stages[0] == 0 and stages[-1] == 2 and np.all(np.diff(stages) >= 0)
    similarity = stage_split.similarity_matrix(train, _alphas_cumprod(),
                                               stage_split.grid_timesteps(1000), num_pairs=64)
    np.testing.assert_allclose(np.diag(similarity), 1.0)
    np.testing.assert_allclose(similarity, similarity.T)
