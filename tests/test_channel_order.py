"""Channel spaces of the U-Net and reorderings that keep its function (pruning by importance)."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from ddsm_jax.models.network import init_network
from ddsm_jax.strategies import channel_order
from tests.helpers import tiny_config


def random_unet(num_groups: int):
    config = tiny_config(num_groups=num_groups)
    network, params = init_network(config, jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [np.asarray(0.2 * jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves)]
    return network, jax.tree_util.tree_unflatten(treedef, leaves)


def forward(network, params, width=1.0):
    x = jax.random.normal(jax.random.key(2), (3, *network.image_shape))
    t = jax.numpy.array([3, 300, 900])
    return np.asarray(jax.jit(network.apply, static_argnames="width")(params, x, t, width=width))


def test_every_channel_axis_belongs_to_exactly_one_space():
    _, params = random_unet(num_groups=4)
    covered = collections.Counter()
    for space in channel_order.unet_spaces(params):
        for path, axis, offset in space.entries:
            axis %= np.ndim(channel_order._get(params, path))
            covered.update((path, axis, c) for c in range(offset, offset + space.size))
    assert max(covered.values()) == 1
    # Axes that are not the network's own channels: the image's, the sinusoidal embedding's.
    fixed = {("head", "kernel"): 2, ("tail_conv", "kernel"): 3, ("tail_conv", "bias"): 0,
             ("temb_dense0", "kernel"): 0}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(k.key for k in path)
        for axis in ([value.ndim - 2, value.ndim - 1] if keys[-1] == "kernel" else [0]):
            if fixed.get(keys) == axis:
                continue
            missing = [c for c in range(value.shape[axis]) if not covered[(keys, axis, c)]]
            assert not missing, (keys, axis)


@pytest.mark.parametrize("seed", [0, 1])
def test_permuting_every_space_keeps_the_function_with_one_group_per_norm(seed):
    network, params = random_unet(num_groups=1)
    spaces = channel_order.unet_spaces(params)
    rng = np.random.default_rng(seed)
    permuted = channel_order.permute(params, spaces, [rng.permutation(s.size) for s in spaces])
    before, after = forward(network, params), forward(network, permuted)
    np.testing.assert_allclose(after, before, rtol=2e-4, atol=2e-5)
    # A permutation that forgets one coupled entry (here the first block's norm2) does not.
    broken = [channel_order.Space(s.name, s.size, [e for e in s.entries if "norm2" not in e[0]])
              for s in spaces]
    orders = [rng.permutation(s.size) for s in spaces]
    assert not np.allclose(forward(network, channel_order.permute(params, broken, orders)),
                           before, atol=1e-3)


def test_ordering_by_importance_puts_important_channels_first_and_keeps_the_function():
    network, params = random_unet(num_groups=1)
    grads = jax.tree_util.tree_map(
        lambda x: np.random.default_rng(x.size).normal(size=x.shape), params)
    ordered = channel_order.order_by_importance(params, grads, num_groups=1)
    np.testing.assert_allclose(forward(network, ordered), forward(network, params),
                               rtol=2e-4, atol=2e-5)
    spaces = channel_order.unet_spaces(params)
    ordered_grads = channel_order.order_by_importance(grads, params, 1)  # same orders, by symmetry
    for score in channel_order.importance(ordered, ordered_grads, spaces):
        assert np.all(np.diff(score) <= 1e-9)
    with pytest.raises(ValueError, match="must permute its"):
        channel_order.permute(params, spaces, [np.zeros(s.size, int) for s in spaces])


def test_with_several_groups_ordering_moves_whole_groups_and_nearly_keeps_the_function():
    network, params = random_unet(num_groups=4)
    spaces = channel_order.unet_spaces(params)
    units = {s.name: channel_order.unit_size(params, s, 4) for s in spaces}
    # No norm reads the time embedding: one run. A block's inner channels: runs of one group.
    # The first decoder block's output is read by its attention's norm (groups of 16) and by
    # the next block's norm over [it, skip] (groups of 24): runs of 8.
    assert units["time embedding"] == 128 and units["('down', 0) inner"] == 8
    assert units["('up', 0) out"] == 8
    order = channel_order.importance_order(np.array([0, 5, 1, 9, 2, 3, 7, 4.0]), unit=4)
    np.testing.assert_array_equal(order, [6, 7, 5, 4, 3, 1, 2, 0])
    grads = jax.tree_util.tree_map(
        lambda x: np.random.default_rng(x.size).normal(size=x.shape), params)
    before = forward(network, params)
    ordered = forward(network, channel_order.order_by_importance(params, grads, 4))
    # Channel by channel, the same scores regroup the norms and change the function far more.
    regrouped = forward(network, channel_order.order_by_importance(params, grads, 1))
    error, regrouped_error = np.abs(ordered - before).max(), np.abs(regrouped - before).max()
    assert error < 0.03 * np.abs(before).max() and error < regrouped_error / 3
