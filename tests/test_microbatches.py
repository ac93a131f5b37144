"""training.microbatch_size: one step's gradients averaged over strided microbatches (the
sharded microbatched step is checked against one device in test_sharding.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddsm_jax.data.pipeline import load_dataset
from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.network import init_network
from ddsm_jax.training.train import train
from ddsm_jax.training.train_step import (
    TrainState,
    accumulate_gradients,
    make_optimizer,
    make_train_step,
    sandwich_loss,
    split_microbatches,
)
from tests.helpers import lowered_op_count, tiny_config

WIDTHS = (1.0, 0.25, 0.5)


def test_microbatches_take_every_count_th_image():
    parts = split_microbatches(jnp.arange(12.0).reshape(12, 1), 4)
    np.testing.assert_array_equal(parts[..., 0], [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
    with pytest.raises(ValueError, match="microbatch_size=5 does not divide the batch of 12"):
        split_microbatches(jnp.zeros((12, 1)), 5)
    with pytest.raises(ValueError, match="microbatch_size=-4 does not divide"):
        split_microbatches(jnp.zeros((12, 1)), -4)


@pytest.mark.parametrize("unroll", [True, False, None])
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


def test_the_loop_is_unrolled_in_cpu_programs_only():
    """The default is chosen for the platform a program is lowered for, not the host's: TPU
    programs compiled ahead of time on a CPU host keep the scan."""
    weights, batch = jnp.ones((3, 2)), jnp.ones((12, 3))

    def gradients(x, key):
        del key
        return jax.grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(weights)

    def loops(platform, unroll=None):
        return lowered_op_count(
            lambda b: accumulate_gradients(gradients, b, jax.random.key(0), 4, unroll=unroll),
            batch, platform=platform, op="stablehlo.while")

    assert loops("cpu") == 0
    assert loops("tpu") == loops("cuda") == 1
    assert loops("cpu", unroll=False) == 1 and loops("tpu", unroll=True) == 0


def test_a_microbatched_step_averages_each_microbatchs_own_sandwich_loss():
    config = tiny_config()
    config.training.microbatch_size = 8
    network, params = init_network(config, jax.random.key(0))
    diffusion = diffusion_from_config(config.diffusion)
    batch = jnp.asarray(load_dataset(config.data).train[:16])
    rng = jax.random.key(3)
    key = jax.random.fold_in(rng, 0)  # step 0
    loss = jax.jit(lambda images, key: sandwich_loss(network, diffusion, params, images, key,
                                                     WIDTHS)[0])
    expected = np.mean([loss(part, jax.random.fold_in(key, index))
                        for index, part in enumerate(split_microbatches(batch, 8))])
    whole_batch_loss = loss(batch, key)

    step = make_train_step(network, diffusion, config.training)
    _, metrics = step(TrainState.create(params, make_optimizer(config.training)), batch, rng,
                      WIDTHS)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    assert not np.isclose(metrics["loss"], whole_batch_loss, rtol=1e-3)  # the split was taken


def test_a_microbatch_that_does_not_split_the_batch_is_a_clear_error(tmp_path):
    config = tiny_config()
    config.training.microbatch_size = 4  # divides 16, but not over the 8 devices: 4 % 8
    with pytest.raises(ValueError, match="microbatch_size=4 must divide training.batch_size=16 "
                                         "and be a multiple of the 8 devices"):
        train(config, tmp_path)
