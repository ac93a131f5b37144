import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.network import init_network
from ddsm_jax.models.unet import SlimmableUNet
from ddsm_jax.sampling import ScheduleSampler, initial_noise, sample_in_batches
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    network, params = init_network(config, jax.random.key(0))
    # Perturb the zero-initialised output layers so that every width predicts something different.
    params = jax.tree_util.tree_map(lambda p: p + 0.02, params)
    return config, network, params, diffusion_from_config(config.diffusion)


def _trace_counter(monkeypatch):
    """Counts how often the network is traced, per width (tracing happens once per compile)."""
    traces = collections.Counter()
    original = SlimmableUNet.__call__

    def counting_call(self, x, t, *, width=1.0, dropout_rng=None):
        traces[width] += 1
        return original(self, x, t, width=width, dropout_rng=dropout_rng)

    monkeypatch.setattr(SlimmableUNet, "__call__", counting_call)
    return traces


@pytest.mark.parametrize("num_steps", [6, 24])
def test_network_is_traced_once_per_distinct_width_whatever_the_step_count(setup, monkeypatch, num_steps):
    config, network, params, diffusion = setup
    traces = _trace_counter(monkeypatch)
    config.sampling.num_steps = num_steps
    sampler = ScheduleSampler(network, diffusion, config.sampling)
    noise = initial_noise(jax.random.key(1), 4, network.image_shape)
    rng = np.random.default_rng(0)
    first = rng.choice([0, 2], size=num_steps)
    first[:2] = [0, 2]
    sampler(params, first, noise, jax.random.key(2))
    assert traces == {1.0: 1, 0.5: 1}
    # Another schedule over the same widths is new data for the same compiled program.
    second = first[::-1].copy()
    sampler(params, second, noise, jax.random.key(2))
    assert traces == {1.0: 1, 0.5: 1}
    assert sampler._jitted._cache_size() == 1
    # A schedule with a third width compiles one more program with three branches.
    third = first.copy()
    third[-1] = 3
    sampler(params, third, noise, jax.random.key(2))
    assert traces == {1.0: 2, 0.5: 2, 0.25: 1}


def test_schedule_output_equals_stepping_the_chosen_widths_by_hand(setup):
    """The switch runs exactly the scheduled sub-network at each DDIM step (eta=0)."""
    config, network, params, diffusion = setup
    config.sampling.num_steps = 5
    config.sampling.eta = 0.0  # the digits default is stochastic; this checks the deterministic path
    sampler = ScheduleSampler(network, diffusion, config.sampling)
    schedule = np.array([3, 3, 1, 0, 2])
    noise = initial_noise(jax.random.key(1), 3, network.image_shape)
    ours = sampler(params, schedule, noise, jax.random.key(5))

    x = noise
    alphas = np.asarray(diffusion.alphas_cumprod, np.float64)
    steps = [*list(sampler.timesteps), -1]
    for i, width_index in enumerate(schedule):
        t, t_prev = steps[i], steps[i + 1]
        eps = network.apply(params, x, jnp.full((3,), t), width=network.widths[width_index])
        a_t, a_prev = alphas[t], (alphas[t_prev] if t_prev >= 0 else 1.0)
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    np.testing.assert_allclose(ours, np.clip(x, -1, 1), atol=2e-4)


def test_sampling_is_deterministic_and_batches_agree(setup):
    config, network, params, diffusion = setup
    config.sampling.num_steps = 4
    sampler = ScheduleSampler(network, diffusion, config.sampling)
    noise = initial_noise(jax.random.key(1), 6, network.image_shape)
    schedule = sampler.uniform(1)
    a = sample_in_batches(sampler, params, schedule, noise, jax.random.key(3), batch_size=4)
    b = sample_in_batches(sampler, params, schedule, noise, jax.random.key(3), batch_size=4)
    assert a.shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(a, b)
    assert sampler._jitted._cache_size() == 1  # the padded last batch reuses the program


def test_bad_schedules_are_clear_errors(setup):
    config, network, params, diffusion = setup
    config.sampling.num_steps = 4
    sampler = ScheduleSampler(network, diffusion, config.sampling)
    noise = initial_noise(jax.random.key(1), 2, network.image_shape)
    with pytest.raises(ValueError, match="4 steps"):
        sampler(params, [0, 0, 0], noise, jax.random.key(0))
    with pytest.raises(ValueError, match="indices"):
        sampler(params, [0, 0, 0, 7], noise, jax.random.key(0))


@pytest.mark.parametrize("batch, devices_used", [(8, 8), (6, 6), (11, 1)])
def test_a_batch_is_split_over_the_devices_that_divide_it_and_samples_as_on_one(
        setup, batch, devices_used):
    """Parameters committed over all devices (as training leaves them) must not make every device
    sample the whole batch; the split changes no sample."""
    config, network, params, diffusion = setup
    config.sampling.num_steps = 4
    assert jax.local_device_count() == 8  # tests/conftest.py
    everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("d",)),
                                            jax.sharding.PartitionSpec())
    committed = jax.device_put(params, everywhere)
    noise = initial_noise(jax.random.key(1), batch, network.image_shape)
    schedule = np.array([0, 3, 1, 2])
    split = ScheduleSampler(network, diffusion, config.sampling)(
        committed, schedule, noise, jax.random.key(2))
    assert len(split.sharding.device_set) == devices_used
    one = ScheduleSampler(network, diffusion, config.sampling, devices=jax.devices()[:1])(
        committed, schedule, noise, jax.random.key(2))
    assert len(one.sharding.device_set) == 1
    # Equal to float rounding: a device's share of the batch may take another convolution path.
    np.testing.assert_allclose(np.asarray(split), np.asarray(one), atol=5e-5)
