"""AdaDiff: the early-exit U-Net against a dense reference, its MACs against XLA's, its loss,
and its exits per sample against each sample run alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.cost import width_macs
from ddsm_jax.models.early_exit_unet import build_early_exit_unet, exit_blocks
from ddsm_jax.models.network import abstract_network, init_network
from ddsm_jax.strategies.adadiff import ExitSampler, early_exit_loss
from tests.helpers import macs_agreeing_with_xla, tiny_config
from tests.reference_unet import DenseUNet, _conv, _linear, _norm
from tests.test_multi_decoder import randomised


def adadiff_config():
    config = tiny_config()
    config.strategy = "adadiff"
    return config


class DenseEarlyExits(DenseUNet):
    """The dense reference U-Net with AdaDiff's heads, built from the same weights: every exit's
    epsilon and uncertainty, by flax's own GroupNorm, Conv and Linear."""

    def __init__(self, slim, groups: int):
        super().__init__(slim, 1.0, groups)
        self.heads = []
        for head in slim.exits:
            c_in = head.norm.scale[...].shape[0]
            self.heads.append((_norm(head.norm, c_in, groups),
                               _conv(head.conv, c_in, slim.image_channels),
                               _linear(head.uncertainty, head.uncertainty.kernel[...].shape[0], 1)))

    def exits(self, x, t):
        h, temb, skips = self.encode(x, t)
        first, outputs = skips[0], []
        for kind, layer in self.up:
            if kind != "res":
                h = layer(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
                continue
            h = self._res(layer, jnp.concatenate([h, skips.pop()], axis=-1), temb)
            if len(outputs) < len(self.heads):
                norm, conv, linear = self.heads[len(outputs)]
                scale = x.shape[1] // h.shape[1]
                up = jnp.repeat(jnp.repeat(h, scale, axis=1), scale, axis=2)
                eps = conv(nnx.silu(norm(jnp.concatenate([up, first], axis=-1))))
                features = jnp.concatenate([h.mean(axis=(1, 2)), nnx.silu(temb)], axis=-1)
                outputs.append((eps, jax.nn.sigmoid(linear(features)[:, 0])))
        return outputs


def test_every_exit_and_the_full_depth_equal_a_dense_reference():
    model = randomised(build_early_exit_unet(adadiff_config(), nnx.Rngs(3)), seed=5)
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    t = np.array([0, 400, 999])
    dense = DenseEarlyExits(model, groups=4)
    reference = jax.jit(lambda x: dense.exits(x, t))(x)
    assert len(reference) == model.num_blocks - 1 == 3
    eps, uncertainty = nnx.jit(lambda m, x: m(x, jnp.asarray(t), all_exits=True))(model, x)
    for k, (ref_eps, ref_u) in enumerate(reference):
        np.testing.assert_allclose(eps[k], ref_eps, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(uncertainty[k], ref_u, rtol=2e-4, atol=2e-6)
        depth = (k + 1) / model.num_blocks
        alone = nnx.jit(lambda m, x, d=depth: m(x, jnp.asarray(t), depth=d))(model, x)
        np.testing.assert_allclose(alone, ref_eps, rtol=2e-4, atol=2e-5)
    full = jax.jit(lambda x: dense(x, t))(x)
    np.testing.assert_allclose(eps[-1], full, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x, jnp.asarray(t)))(model, x), full,
                               rtol=2e-4, atol=2e-5)


def test_exit_macs_agree_with_xla_and_grow_with_depth():
    network, params = abstract_network(adadiff_config())
    assert network.branch_arg == "depth" and network.widths == (1.0, 0.75, 0.5, 0.25)
    totals = [macs_agreeing_with_xla(network, params, 0.01, depth=depth).total
              for depth in network.widths]
    assert totals == sorted(totals, reverse=True) and totals[-1] < 0.5 * totals[0]
    unet_network, unet_params = abstract_network(tiny_config())
    assert totals[0] == width_macs(unet_network, unet_params, 1.0).total  # no head at full depth


def test_exit_depths_name_whole_blocks():
    assert [exit_blocks(d, 4) for d in (1.0, 0.75, 0.5, 0.25)] == [4, 3, 2, 1]
    with pytest.raises(ValueError, match="exit depth 0.1 of a decoder with 4"):
        exit_blocks(0.1, 4)
    config = adadiff_config()
    config.adadiff.exit_depths = (1.0, 0.1)
    with pytest.raises(ValueError, match="exit depth 0.1"):
        abstract_network(config)


def test_the_loss_trains_estimators_only_through_their_targets():
    config = adadiff_config()
    network, params = init_network(config, jax.random.key(0))
    diffusion = diffusion_from_config(config.diffusion)
    x0 = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1, maxval=1)

    @jax.jit
    def gradients(weights):
        return jax.grad(lambda p: early_exit_loss(
            network, diffusion, p, x0, jax.random.key(2), network.widths,
            uncertainty_weight=weights[0], layer_weight=weights[1],
            plain_layer_weight=weights[2])[0])(params)

    no_uncertainty = gradients(jnp.array([0.0, 1.0, 1.0]))
    for head in no_uncertainty["exits"].values():  # the (1 - u) weight is not differentiated
        assert not np.any(head["uncertainty"]["kernel"]) and np.any(head["conv"]["kernel"])
    only_full = gradients(jnp.array([0.0, 0.0, 0.0]))
    for head in only_full["exits"].values():
        assert not np.any(head["conv"]["kernel"]) and not np.any(head["norm"]["scale"])
    everything = gradients(jnp.array([1.0, 1.0, 1.0]))
    assert all(np.any(h["uncertainty"]["kernel"]) for h in everything["exits"].values())
    loss, per_depth = early_exit_loss(network, diffusion, params, x0, jax.random.key(2),
                                      network.widths, uncertainty_weight=1.0, layer_weight=1.0,
                                      plain_layer_weight=1.0)
    assert per_depth.shape == (4,) and loss > per_depth[0]  # the full depth's MSE and more


def test_per_sample_exits_equal_each_sample_sampled_alone():
    config = adadiff_config()
    config.sampling.num_steps = 4
    config.sampling.eta = 0.0  # deterministic DDIM: a sample alone meets the same trajectory
    network, params = init_network(config, jax.random.key(0))
    params = randomised_params(params)
    diffusion = diffusion_from_config(config.diffusion)
    x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
    key = jax.random.key(2)
    _, uncertainty = network.apply(params, x, jnp.full(6, 500), all_exits=True)
    threshold = float(np.median(np.asarray(uncertainty)))  # some exit early, some do not
    images, taken = ExitSampler(network, diffusion, config.sampling)(params, threshold, x, key)
    assert taken.shape == (6, 4) and len(np.unique(np.asarray(taken))) > 1
    one_by_one = ExitSampler(network, diffusion, config.sampling, per_batch=True)
    for i in range(6):  # a batch of one leaves exactly where that sample would
        alone, alone_taken = one_by_one(params, threshold, x[i:i + 1], key)
        np.testing.assert_array_equal(alone_taken[0], taken[i])
        np.testing.assert_allclose(alone[0], images[i], rtol=1e-4, atol=1e-4)


def randomised_params(params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_thresholds_choose_sampling_only():
    from ddsm_jax.training.checkpoint import identity_differences, network_identity

    config, other = adadiff_config(), adadiff_config()
    other.adadiff.thresholds = (0.9,)
    assert identity_differences(network_identity(config), network_identity(other)) == []
    older = network_identity(config)
    older["adadiff"]["thresholds"] = [0.1]  # recorded by checkpoints before it was left out
    assert identity_differences(older, network_identity(other)) == []
    other.adadiff.layer_weight = 0.5
    assert identity_differences(network_identity(config), network_identity(other)) == [
        "adadiff.layer_weight: 1.0 in the checkpoint, 0.5 now"]
