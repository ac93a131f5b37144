"""Step-Adaptive Training's timestep groups and width allocation, against brute force."""

import itertools

import numpy as np
import pytest

from ddsm_jax.diffusion.samplers import sampling_timesteps
from ddsm_jax.diffusion.schedules import make_betas
from ddsm_jax.strategies import step_groups


def _brute_force_split(snr, k):
    n = len(snr)
    low, high = n // (2 * k), -(-3 * n // (2 * k))
    best, best_cost = None, np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        sizes = np.diff(bounds)
        if sizes.min() < max(low, 1) or sizes.max() > high:
            continue
        cost = sum(np.sum((snr[a:b] - snr[a:b].mean()) ** 2) for a, b in itertools.pairwise(bounds))
        if cost < best_cost:
            best, best_cost = np.repeat(np.arange(k), sizes), cost
    return best


@pytest.mark.parametrize("num_steps,k", [(10, 2), (20, 3), (20, 4), (12, 4)])
def test_snr_split_is_the_best_contiguous_split_within_the_size_bounds(num_steps, k):
    alphas_cumprod = np.cumprod(1 - make_betas("linear", 1000, 1e-4, 0.02))
    timesteps = sampling_timesteps("ddim", 1000, num_steps, "uniform")
    snr = step_groups.log_snr(alphas_cumprod, timesteps)
    groups = step_groups.split_by_snr(snr, k)
    np.testing.assert_array_equal(groups, _brute_force_split(snr, k))
    assert sorted(set(groups)) == list(range(k)) and np.all(np.diff(groups) >= 0)


def test_widths_follow_difficulty_and_spend_the_most_within_the_budget():
    macs = [100.0, 57.0, 26.0, 7.0]
    sizes = [5, 5, 5, 5]
    # group 0 hardest, group 3 easiest
    got = step_groups.allocate_widths([4, 3, 2, 1], sizes, macs, budget=0.5)
    ratio = np.dot(sizes, np.take(macs, got)) / sum(sizes) / macs[0]
    assert ratio <= 0.5 and list(got) == sorted(got)  # harder groups never narrower
    best = max(np.dot(sizes, np.take(macs, c)) for c in itertools.product(range(4), repeat=4)
               if list(c) == sorted(c) and np.dot(sizes, np.take(macs, c)) / 20 / 100 <= 0.5)
    assert np.isclose(ratio * 100 * 20, best)
    assert step_groups.allocate_widths([1, 2], [3, 3], macs, budget=1.0) == (0, 0)
    with pytest.raises(ValueError, match="cheapest costs 0.070"):
        step_groups.allocate_widths([1, 2], [3, 3], macs, budget=0.05)
