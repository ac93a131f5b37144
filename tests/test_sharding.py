"""Sharded training on 8 simulated CPU devices (see conftest.py) against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ddsm_jax.data.pipeline import load_dataset
from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.network import init_network
from ddsm_jax.training.sharding import batch_sharding, make_mesh
from ddsm_jax.training.train_step import TrainState, make_optimizer, make_train_step, sharded_train_state
from tests.helpers import tiny_config


def test_there_are_eight_simulated_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("data,fsdp,shape", [(-1, 1, (8, 1)), (-1, 2, (4, 2)), (2, 4, (2, 4))])
def test_mesh_shape_comes_from_the_config(data, fsdp, shape):
    config = tiny_config()
    config.mesh.data, config.mesh.fsdp = data, fsdp
    mesh = make_mesh(config.mesh)
    assert (mesh.shape["data"], mesh.shape["fsdp"]) == shape


def test_a_mesh_that_does_not_fit_the_devices_is_a_clear_error():
    config = tiny_config()
    config.mesh.data, config.mesh.fsdp = 3, 2
    with pytest.raises(ValueError, match="8 devices"):
        make_mesh(config.mesh)


@pytest.mark.parametrize("fsdp,microbatch_size", [(1, 0), (2, 0), (1, 8)])
def test_sharded_step_equals_the_single_device_step(fsdp, microbatch_size):
    config = tiny_config()
    # The digits config's step size: Adam moves every parameter by about the learning rate, so
    # the float noise of a different reduction order grows with it; the tolerance below is for 1e-3.
    config.training.learning_rate = 1e-3
    config.mesh.fsdp = fsdp
    config.training.microbatch_size = microbatch_size
    network, params = init_network(config, jax.random.key(0))
    diffusion = diffusion_from_config(config.diffusion)
    optimizer = make_optimizer(config.training)
    batches = jnp.asarray(load_dataset(config.data).train[:48]).reshape(3, 16, 8, 8, 1)
    rng = jax.random.key(3)
    widths = (1.0, 0.25)  # two sub-networks: the sum of their losses is what is sharded

    single = make_train_step(network, diffusion, config.training)
    state = TrainState.create(jax.tree_util.tree_map(jnp.copy, params), optimizer)  # donated below
    single_losses = []
    for batch in batches:
        state, metrics = single(state, batch, rng, widths)
        single_losses.append(float(metrics["loss"]))
    single_params = jax.device_get(state.params)

    mesh = make_mesh(config.mesh)
    sharded_state, sharding = sharded_train_state(params, optimizer, mesh)
    data_sharding = batch_sharding(mesh)
    sharded = make_train_step(network, diffusion, config.training, state_sharding=sharding,
                              batch_sharding=data_sharding)
    sharded_losses = []
    for batch in batches:
        sharded_state, metrics = sharded(sharded_state, jax.device_put(batch, data_sharding), rng, widths)
        sharded_losses.append(float(metrics["loss"]))

    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    for ours, reference in zip(jax.tree_util.tree_leaves(jax.device_get(sharded_state.params)),
                               jax.tree_util.tree_leaves(single_params)):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-6)
    kernel = sharded_state.params["mid"][0]["conv1"]["kernel"]  # 3x3x64x64
    assert len(kernel.sharding.device_set) == 8
    if fsdp == 2:  # large leaves are split over the fsdp axis, small ones replicated
        assert "fsdp" in tuple(kernel.sharding.spec)
        assert sharded_state.params["head"]["bias"].sharding.spec == P()
    else:
        assert kernel.sharding.spec == P()
