"""The convolution with chunked weight gradients computes the same gradients as XLA's own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ddsm_jax.models.conv import MAX_CHUNKS, conv2d, num_chunks, xla_conv
from ddsm_jax.models.network import init_network
from ddsm_jax.training.sharding import BATCH_AXES, make_mesh
from tests.helpers import lowered_op_count, tiny_config


@pytest.mark.parametrize("batch,chunk,devices,expected", [
    (8, 4, 1, 2), (32, 4, 1, 8), (6, 4, 1, 1), (12, 4, 1, 3), (10, 4, 1, 2),
    (1024, 4, 1, MAX_CHUNKS), (64, 4, 8, 2), (16, 4, 8, 1), (8, 0, 1, 1), (9, 4, 2, 1)])
def test_chunks_divide_each_devices_batch(batch, chunk, devices, expected):
    assert num_chunks(batch, chunk, devices) == expected


def _convolutions(grad, *args, platform: str = "cpu") -> int:
    """Convolutions in the gradient lowered for `platform`: each weight-gradient chunk adds one."""
    return lowered_op_count(grad, *args, platform=platform, op="stablehlo.convolution")


def _gradients(x, kernel, stride, chunk):
    def loss(x, kernel):
        return jnp.sum(jnp.sin(conv2d(x, kernel, stride=stride, weight_grad_chunk=chunk)))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)


@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (3, 2), (1, 1)])
def test_chunked_weight_gradient_matches_one_convolution(kernel_size, stride):
    x = jax.random.normal(jax.random.key(0), (64, 16, 16, 16))
    kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 16, 24)) * 0.1
    whole = _gradients(x, kernel, stride, 0)
    chunked = _gradients(x, kernel, stride, 4)
    for a, b in zip(whole, chunked, strict=True):  # float32 sums in another order
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))
    if kernel_size == 3:  # the split is really taken: a weight-gradient product per chunk
        def grad(chunk):
            return jax.grad(lambda k: jnp.sum(conv2d(x, k, stride=stride,
                                                     weight_grad_chunk=chunk)))
        assert (_convolutions(grad(4), kernel)
                >= _convolutions(grad(0), kernel) + num_chunks(64, 4, jax.device_count()) - 1)
        # Chosen for the platform the program is lowered for, not the host's backend: a TPU
        # or GPU program built on this CPU machine keeps XLA's one weight-gradient convolution.
        for platform in ("tpu", "cuda"):
            assert (_convolutions(grad(4), kernel, platform=platform)
                    == _convolutions(grad(0), kernel, platform=platform))


def test_one_by_one_kernel_is_the_same_product_as_a_convolution():
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 16))
    kernel = jax.random.normal(jax.random.key(1), (1, 1, 16, 8))
    np.testing.assert_allclose(conv2d(x, kernel), xla_conv(x, kernel), rtol=1e-5, atol=1e-5)


def test_network_gradients_with_chunks_match_and_stay_sharded():
    """A batch-sharded step: each chunk is a strided slice that every device holds part of."""
    config = tiny_config()
    config.data.image_size = 16  # the split needs 16x16 feature maps or larger
    config.model.weight_grad_chunk = 0
    network, params = init_network(config, jax.random.key(0))
    config.model.weight_grad_chunk = 2
    chunked_network, _ = init_network(config, jax.random.key(0))
    batch = 4 * jax.device_count()  # 4 images per device: 2 chunks of 2
    assert num_chunks(batch, 2, jax.device_count()) == 2
    sharding = NamedSharding(make_mesh(config.mesh), PartitionSpec(BATCH_AXES))
    x = jax.device_put(jax.random.normal(jax.random.key(1), (batch, *network.image_shape)),
                       sharding)
    t = jax.device_put(jnp.arange(batch) * 7, sharding)

    def loss(net):
        return lambda p: jnp.mean(net.apply(p, x, t, width=0.5, dropout_rng=jax.random.key(2)) ** 2)

    def grads(net):
        return jax.jit(jax.grad(loss(net)))(params)

    # the 16x16 layers split
    assert (_convolutions(jax.grad(loss(chunked_network)), params)
            > _convolutions(jax.grad(loss(network)), params))

    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                           grads(network), grads(chunked_network))
