"""Population sampling: prefix sharing, devices and the plain sampler all give the same samples."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.network import init_network
from ddsm_jax.sampling import ScheduleSampler, initial_noise
from ddsm_jax.search.population import PopulationSampler, naive_evaluations, plan_evaluation
from ddsm_jax.search.trajectory_cache import TrajectoryCache, keep_steps_for_budget, state_bytes
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
    shared = population_sampler(params, POPULATION, noise, key)
    separate = population_sampler(params, POPULATION, noise, key, share_prefixes=False)
    (shared, plan), (separate, plan_separate) = ((r.samples, r.plan) for r in (shared, separate))
    assert plan.network_evaluations < plan_separate.network_evaluations
    np.testing.assert_array_equal(shared, separate)
    # Common random numbers: identical schedules score identical samples.
    np.testing.assert_array_equal(shared[1], shared[5])


def test_population_on_eight_devices_equals_one_device_and_the_plain_sampler(setup):
    sampler, params, noise, key = setup
    assert len(jax.devices()) == 8
    one = PopulationSampler(sampler, Mesh(np.asarray(jax.devices()[:1]), ("pop",)))
    eight = PopulationSampler(sampler)
    samples_one = one(params, POPULATION, noise, key).samples
    samples_eight = eight(params, POPULATION, noise, key).samples
    np.testing.assert_allclose(samples_eight, samples_one, rtol=1e-5, atol=1e-5)
    for schedule, samples in zip(POPULATION, samples_one):
        plain = np.asarray(sampler(params, schedule, noise, key))
        np.testing.assert_allclose(samples, plain, rtol=1e-5, atol=1e-5)


def test_children_started_from_kept_parent_states_give_bitwise_the_same_samples(setup):
    sampler, params, noise, key = setup
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("pop",))
    keep_steps = keep_steps_for_budget(6, len(POPULATION), state_bytes(4, (8, 8, 1)), 1.0)
    assert keep_steps == (0, 1, 2, 3, 4)
    keeping = PopulationSampler(sampler, mesh, keep_steps=keep_steps)
    parents = keeping(params, POPULATION, noise, key)
    cache = TrajectoryCache(keep_steps)
    cache.add(POPULATION, parents.kept)
    cache.retain(POPULATION[[0, 2, 3]])  # [3]*6 is dropped
    assert len(cache) == 3
    children = np.array([[0, 0, 0, 1, 2, 3],   # 4 steps of parent 0
                         [3, 3, 3, 3, 3, 0],   # parent 1 was dropped: from scratch
                         [0, 0, 0, 2, 2, 1],   # 5 steps of parent 2
                         [0, 0, 0, 2, 2, 3],   # the same 5 steps
                         [1, 1, 1, 1, 1, 1]], np.int32)
    starts, start_states = cache.lookup(children)
    np.testing.assert_array_equal(starts, [4, 0, 5, 5, 0])
    resumed = keeping(params, children, noise, key, starts=starts, start_states=start_states)
    fresh = keeping(params, children, noise, key)
    np.testing.assert_array_equal(resumed.samples, fresh.samples)
    # 30 naive calls; sharing inside a device's block (a, b, c | d, e) makes 22, the cache 16.
    assert fresh.plan.network_evaluations == 6 + 3 + 1 + 6 + 6
    assert resumed.plan.network_evaluations == 2 + 6 + 1 + 1 + 6
    # Kept states of steps a child skipped come from its parent: every one is exact.
    cache.add(children, resumed.kept)
    for row, states in zip(children, fresh.kept):
        np.testing.assert_array_equal(cache._states[row.astype(np.int64).tobytes()], states)


def test_keep_steps_fit_the_memory_budget():
    assert keep_steps_for_budget(20, 16, 2**20, 0) == ()
    assert keep_steps_for_budget(20, 16, 2**20, 32 * 19) == tuple(range(19))
    spread = keep_steps_for_budget(1000, 50, 2**20, 100 * 10)
    assert len(spread) == 10 and spread[0] == 0 and spread[-1] == 998


def test_candidates_on_their_own_timesteps_share_only_what_is_really_shared(setup):
    """Where the search chooses timesteps, a step's result depends on its width, its timestep
    and where it goes (the next timestep): prefixes are shared exactly that far, bitwise."""
    sampler, params, noise, key = setup
    widths = np.array([[0, 0, 0, 1, 1, 1],
                       [0, 0, 0, 1, 1, 1],   # same widths, its 4th timestep differs
                       [0, 0, 0, 1, 1, 1],   # the config's grid
                       [2, 1, 0, 3, 2, 1]], np.int32)
    timesteps = np.array([[900, 700, 500, 300, 100, 0],
                          [900, 700, 500, 250, 100, 0],
                          sampler.timesteps,
                          [990, 800, 420, 200, 50, 3]], np.int32)
    population_sampler = PopulationSampler(sampler, Mesh(np.asarray(jax.devices()[:1]), ("pop",)))
    codes = population_sampler.prefix_codes(widths, timesteps)
    # Step 2 of the first two goes to 300 vs 250: they agree on steps 0 and 1 only.
    np.testing.assert_array_equal(codes[0] == codes[1], [True, True, False, False, True, True])
    shared = population_sampler(params, widths, noise, key, timesteps=timesteps)
    separate = population_sampler(params, widths, noise, key, timesteps=timesteps,
                                  share_prefixes=False)
    assert shared.plan.network_evaluations == separate.plan.network_evaluations - 2
    np.testing.assert_array_equal(shared.samples, separate.samples)
    for k in (1, 3):
        plain = np.asarray(sampler.with_timesteps(timesteps[k])(params, widths[k], noise, key))
        np.testing.assert_allclose(shared.samples[k], plain, rtol=1e-5, atol=1e-5)
    # On the config's grid, explicit timesteps are the default ones.
    np.testing.assert_array_equal(
        shared.samples[2], population_sampler(params, widths[2:3], noise, key).samples[0])
    with pytest.raises(ValueError, match="descend"):
        population_sampler(params, widths[:1], noise, key, timesteps=timesteps[:1, ::-1])
