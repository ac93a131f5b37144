"""The hot loops neither copy to the host nor compile again once warm (issue 6).

`jax.transfer_guard("disallow")` raises on any implicit host<->device transfer, so a Python-side
`float(loss)` or a numpy round trip inside a step would fail these tests; the compiled programs
must also hold no host callbacks. A `CompileCounter` proves warm calls reuse their executables.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.network import init_network
from ddsm_jax.sampling import ScheduleSampler, initial_noise, split_batch
from ddsm_jax.search.population import PopulationSampler, plan_evaluation
from ddsm_jax.training.sandwich import sandwich_widths
from ddsm_jax.training.train_step import TrainState, make_optimizer, make_train_step
from ddsm_jax.utils.compile_counter import CompileCounter
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    network, params = init_network(config, jax.random.key(0))
    return config, network, params, diffusion_from_config(config.diffusion)


def _assert_no_host_callbacks(jitted, *args, **kwargs) -> None:
    # The instructions only: the text's tables of source frames name this function.
    text = jitted.lower(*args, **kwargs).compile().as_text()
    calls = re.findall(r'custom_call_target="([^"]*)"', text)
    assert not [c for c in calls if "callback" in c.lower()], "a host callback in a hot loop"


def test_train_steps_stay_on_device_and_compile_once_per_sandwich(setup):
    config, network, params, diffusion = setup
    step = make_train_step(network, diffusion, config.training)
    params = jax.tree_util.tree_map(jnp.copy, params)  # the step donates its state
    state = TrainState.create(params, make_optimizer(config.training))
    batch = jax.device_put(np.zeros((8, *network.image_shape), np.float32))
    rng = jax.random.key(1)
    sandwiches = [sandwich_widths(network.widths, config.seed, i) for i in range(12)]
    assert len(set(sandwiches)) == len(network.widths) - 2  # one per middle width
    with CompileCounter() as warm_up:
        for widths in sorted(set(sandwiches)):
            state, _ = step(state, batch, rng, widths)
    assert warm_up.count >= len(set(sandwiches))
    _assert_no_host_callbacks(step, state, batch, rng, sandwiches[0])
    with CompileCounter() as warm, jax.transfer_guard("disallow"):
        for widths in sandwiches:
            state, metrics = step(state, batch, rng, widths)
        jax.block_until_ready((state, metrics))
    assert warm.count == 0, f"recompiled after warm-up: {dict(warm.by_name)}"
    assert int(state.step) == len(set(sandwiches)) + len(sandwiches)


def test_sampler_stays_on_device_and_compiles_once_per_width_set(setup):
    config, network, params, diffusion = setup
    sampler = ScheduleSampler(network, diffusion, config.sampling)
    noise, key = initial_noise(jax.random.key(1), 4, network.image_shape), jax.random.key(2)
    rng = np.random.default_rng(0)
    narrowest = len(network.widths) - 1  # every schedule uses widths {full, narrowest}
    schedules = [np.where(rng.random(sampler.num_steps) < 0.5, 0, narrowest) for _ in range(4)]
    for schedule in schedules:
        schedule[:2] = 0, narrowest
    with CompileCounter() as warm_up:
        first = sampler(params, schedules[0], noise, key)
    assert warm_up.count >= 1
    used = tuple(network.branch(0, i) for i in np.unique(schedules[0]))
    branch = jax.device_put(np.searchsorted(np.unique(schedules[0]), schedules[0]).astype(np.int32))
    placed_params, placed_noise, placed_key = split_batch(sampler.devices, params, noise, key)
    _assert_no_host_callbacks(sampler._jitted, placed_params, branch, placed_noise, placed_key,
                              branches=used)
    with CompileCounter() as warm, jax.transfer_guard_device_to_host("disallow"):
        again = sampler(params, schedules[0], noise, key)
        for schedule in schedules[1:]:  # the same widths at other steps: new data, same program
            sampler(params, schedule, noise, key)
        jax.block_until_ready(again)
    assert warm.count == 0, f"recompiled after warm-up: {dict(warm.by_name)}"
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))


def test_population_sampling_stays_on_device_and_compiles_once_per_shape(setup):
    config, network, params, diffusion = setup
    sampler = ScheduleSampler(network, diffusion, config.sampling)
    population_sampler = PopulationSampler(sampler, Mesh(np.asarray(jax.devices()[:2]), ("pop",)))
    noise, key = initial_noise(jax.random.key(1), 4, network.image_shape), jax.random.key(2)
    rng = np.random.default_rng(0)

    def population():
        return rng.integers(0, len(network.widths), (6, sampler.num_steps)).astype(np.int32)

    population_sampler(params, population(), noise, key)
    with CompileCounter() as warm:
        for _ in range(2):
            population_sampler(params, population(), noise, key)
    assert warm.count == 0, f"recompiled after warm-up: {dict(warm.by_name)}"
    candidates = population()
    plan = plan_evaluation(population_sampler.prefix_codes(candidates),
                           population_sampler.num_shards)
    rows = population_sampler.step_rows(candidates)[plan.order]
    args = [population_sampler.place(a) for a in (rows, plan.representative)]
    initial = population_sampler._broadcast(noise, len(plan.order))
    _assert_no_host_callbacks(population_sampler._run, params, *args, initial, key)
    with jax.transfer_guard_device_to_host("disallow"):
        jax.block_until_ready(population_sampler._run(params, *args, initial, key))
