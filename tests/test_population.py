"""Population sampling: prefix sharing, devices and the plain sampler all give the same samples."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.network import init_network
from ddsm_jax.sampling import ScheduleSampler, initial_noise
from ddsm_jax.search.population import PopulationSampler, naive_evaluations, plan_evaluation
from tests.helpers import tiny_config

# Six schedules over 6 steps; three share their first 3 steps, two share all but the last.
POPULATION = np.array([
    [0, 0, 0, 1, 1, 1],
    [3, 3, 3, 3, 3, 3],
    [0, 0, 0, 2, 2, 2],
    [0, 0, 0, 1, 1, 2],
    [2, 1, 0, 3, 2, 1],
    [3, 3, 3, 3, 3, 3],  # a duplicate: shares everything
], np.int32)


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    config.sampling.num_steps = 6
    network, params = init_network(config, jax.random.key(0))
    sampler = ScheduleSampler(network, diffusion_from_config(config.diffusion), config.sampling)
    noise = initial_noise(jax.random.key(1), 4, network.image_shape)
    return sampler, params, noise, jax.random.key(2)


def test_plan_counts_each_shared_prefix_once():
    plan = plan_evaluation(POPULATION, num_shards=1)
    # Trie nodes: [0,0,0] shared by 3 (3 calls), then 1,1 vs 2,2,2: [0,0,0,1] (1), [0,0,0,1,1] (1),
    # [0,0,0,1,1,1] and [0,0,0,1,1,2] (2), [0,0,0,2,2,2] (3); [3]*6 once (6); [2,1,0,3,2,1] (6).
    assert plan.network_evaluations == 3 + 1 + 1 + 2 + 3 + 6 + 6
    assert naive_evaluations(POPULATION) == 36
    assert plan_evaluation(POPULATION, share_prefixes=False).network_evaluations == 36
    # Sharing only happens inside a device's block.
    assert plan_evaluation(POPULATION, num_shards=6).network_evaluations == 36
    padded = plan_evaluation(POPULATION, num_shards=4)
    assert padded.schedules.shape == (8, 6) and padded.num_candidates == 6


def test_prefix_sharing_gives_bitwise_the_samples_of_no_sharing(setup):
    sampler, params, noise, key = setup
    population_sampler = PopulationSampler(sampler, Mesh(np.asarray(jax.devices()[:1]), ("pop",)))
    shared, plan = population_sampler(params, POPULATION, noise, key)
    separate, plan_separate = population_sampler(params, POPULATION, noise, key,
                                                 share_prefixes=False)
    assert plan.network_evaluations < plan_separate.network_evaluations
    np.testing.assert_array_equal(shared, separate)
    # Common random numbers: identical schedules score identical samples.
    np.testing.assert_array_equal(shared[1], shared[5])


def test_population_on_eight_devices_equals_one_device_and_the_plain_sampler(setup):
    sampler, params, noise, key = setup
    assert len(jax.devices()) == 8
    one = PopulationSampler(sampler, Mesh(np.asarray(jax.devices()[:1]), ("pop",)))
    eight = PopulationSampler(sampler)
    samples_one, _ = one(params, POPULATION, noise, key)
    samples_eight, _ = eight(params, POPULATION, noise, key)
    np.testing.assert_allclose(samples_eight, samples_one, rtol=1e-5, atol=1e-5)
    for schedule, samples in zip(POPULATION, samples_one):
        plain = np.asarray(sampler(params, schedule, noise, key))
        np.testing.assert_allclose(samples, plain, rtol=1e-5, atol=1e-5)
