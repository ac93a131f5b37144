"""training.microbatch_size: one step's gradients averaged over strided microbatches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddsm_jax.data.pipeline import load_dataset
from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.network import init_network
from ddsm_jax.training.sharding import batch_sharding, make_mesh
from ddsm_jax.training.train import train
from ddsm_jax.training.train_step import (TrainState, accumulate_gradients, make_optimizer,
                                          make_train_step, sandwich_loss, sharded_train_state,
                                          split_microbatches)
from tests.helpers import tiny_config

WIDTHS = (1.0, 0.25, 0.5)


def test_microbatches_take_every_count_th_image():
    parts = split_microbatches(jnp.arange(12.0).reshape(12, 1), 4)
    np.testing.assert_array_equal(parts[..., 0], [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
    with pytest.raises(ValueError, match="microbatch_size=5 does not divide the batch of 12"):
        split_microbatches(jnp.zeros((12, 1)), 5)
    with pytest.raises(ValueError, match="microbatch_size=-4 does not divide"):
        split_microbatches(jnp.zeros((12, 1)), -4)


@pytest.mark.parametrize("unroll", [True, False])
def test_accumulated_gradients_equal_the_whole_batch_ones(unroll):
    weights = jax.random.normal(jax.random.key(0), (3, 2))
    batch = jax.random.normal(jax.random.key(1), (12, 3))

    def gradients(x, key):
        del key  # a key-free loss: the microbatch mean must equal the batch mean exactly
        return jax.value_and_grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(weights)

    whole = gradients(batch, None)
    accumulated = jax.jit(lambda b: accumulate_gradients(gradients, b, jax.random.key(2), 4,
                                                         unroll=unroll))(batch)
    for ours, reference in zip(jax.tree_util.tree_leaves(accumulated),
                               jax.tree_util.tree_leaves(whole)):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)


def test_a_microbatched_step_averages_each_microbatchs_loss_and_shards_as_one_device():
    config = tiny_config()
    config.training.microbatch_size = 8
    network, params = init_network(config, jax.random.key(0))
    diffusion = diffusion_from_config(config.diffusion)
    optimizer = make_optimizer(config.training)
    batch = jnp.asarray(load_dataset(config.data).train[:16])
    rng = jax.random.key(3)
    key = jax.random.fold_in(rng, 0)  # step 0
    expected = np.mean([sandwich_loss(network, diffusion, params, part,
                                      jax.random.fold_in(key, index), WIDTHS)[0]
                        for index, part in enumerate(split_microbatches(batch, 8))])
    whole_batch_loss = sandwich_loss(network, diffusion, params, batch, key, WIDTHS)[0]

    single = make_train_step(network, diffusion, config.training)
    state = TrainState.create(jax.tree_util.tree_map(jnp.copy, params), optimizer)  # donated
    state, single_metrics = single(state, batch, rng, WIDTHS)
    np.testing.assert_allclose(single_metrics["loss"], expected, rtol=1e-5)
    assert not np.isclose(single_metrics["loss"], whole_batch_loss, rtol=1e-3)  # split taken

    mesh = make_mesh(config.mesh)
    sharded_state, sharding = sharded_train_state(params, optimizer, mesh)
    data_sharding = batch_sharding(mesh)
    sharded = make_train_step(network, diffusion, config.training, state_sharding=sharding,
                              batch_sharding=data_sharding)
    sharded_state, sharded_metrics = sharded(sharded_state, jax.device_put(batch, data_sharding),
                                             rng, WIDTHS)
    np.testing.assert_allclose(sharded_metrics["loss"], single_metrics["loss"], rtol=1e-5)
    for ours, reference in zip(jax.tree_util.tree_leaves(jax.device_get(sharded_state.params)),
                               jax.tree_util.tree_leaves(jax.device_get(state.params))):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-6)


def test_a_microbatch_that_does_not_split_the_batch_is_a_clear_error(tmp_path):
    config = tiny_config()
    config.training.microbatch_size = 4  # divides 16, but not over the 8 devices: 4 % 8
    with pytest.raises(ValueError, match="microbatch_size=4 must divide training.batch_size=16 "
                                         "and be a multiple of the 8 devices"):
        train(config, tmp_path)
