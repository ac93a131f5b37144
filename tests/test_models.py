import json
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddsm_jax import configs
from ddsm_jax.configs import cifar10, digits
from ddsm_jax.models.cost import macs_table, schedule_cost, width_macs
from ddsm_jax.models.network import abstract_network, init_network, param_count
from ddsm_jax.models.slimmable import make_divisible
from ddsm_jax.models.unet import build_unet
from tests.helpers import tiny_config
from tests.reference_unet import DenseUNet, paper_rounding

PAPER_CIFAR10_MMACS = {1.0: 6070.0, 0.75: 3420.0, 0.5: 1520.0, 0.25: 382.5}


def test_cifar10_network_has_the_ddpm_parameter_count():
    _, params = abstract_network(cifar10.get_config())
    assert param_count(params) == 35_746_307


@pytest.mark.parametrize("value,divisor,expected", [
    (96.0, 8, 96), (32.0, 8, 32), (10.0, 8, 16), (11.9, 8, 16), (3.0, 8, 8), (7.5, 1, 8), (0.2, 1, 1),
    (100.0, 16, 96), (85.0, 16, 80), (22.0, 16, 32)])
def test_make_divisible_follows_mobilenet_rounding(value, divisor, expected):
    assert make_divisible(value, divisor) == expected == paper_rounding(value, divisor)


def test_cifar10_macs_per_width_match_the_paper_within_one_percent():
    network, params = abstract_network(cifar10.get_config())
    table = macs_table(network, params)
    for width, paper in PAPER_CIFAR10_MMACS.items():
        ours = table[width]["conv_linear"] / 1e6
        assert abs(ours - paper) / paper < 0.01, (width, ours, paper)
        assert table[width]["total"] > table[width]["conv_linear"]


@pytest.mark.parametrize("config_module", [digits, cifar10])
def test_analytic_macs_agree_with_xla_cost_analysis(config_module):
    """XLA skips multiplications with conv padding; with those removed the counts must agree."""
    network, params = abstract_network(config_module.get_config())
    x = jax.ShapeDtypeStruct((2, *network.image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    for width in network.widths:
        counter = width_macs(network, params, width)
        forward = partial(network.apply, width=width)
        lowered = jax.jit(forward).lower(params, x, t)
        xla_flops = lowered.cost_analysis()["flops"]
        ours = 2 * 2 * (counter.total - counter.conv_padding)  # 2 images, 2 FLOPs per MAC
        assert abs(ours - xla_flops) / xla_flops < 0.005, (width, ours, xla_flops)


RELEASE_SCHEDULE = configs.DIRECTORY / "release_cifar10_schedule.json"  # the release's searched widths


def test_schedule_cost_of_the_release_schedule_saves_about_half():
    widths_by_t = json.loads(RELEASE_SCHEDULE.read_text())["widths_per_timestep"]
    network, params = abstract_network(cifar10.get_config())
    table = macs_table(network, params)
    per_width = [table[w]["conv_linear"] for w in network.widths]
    schedule = [network.widths.index(float(w)) for w in widths_by_t[::-1]]  # sampling order
    cost = schedule_cost(per_width, schedule)
    # The paper reports a mean of 3098 MMACs, i.e. 49% saved.
    assert abs(cost["macs_mean"] / 1e6 - 3098) / 3098 < 0.01
    assert abs((1 - cost["macs_ratio"]) - 0.49) < 0.01
    with pytest.raises(ValueError, match="indices"):
        schedule_cost(per_width, [0, 4])


@pytest.mark.parametrize("width", [1.0, 0.75, 0.5, 0.25, (0.75, 0.5, 1.0), (0.25, 1.0, 0.5),
                                   (1.0, 0.25, 0.25)])
def test_width_subnetwork_equals_a_dense_network_of_the_sliced_weights(width):
    """One width, or (encoder, middle, decoder) widths (`model.stage_widths`)."""
    config = tiny_config(ch=32, num_groups=4)
    model = build_unet(config, nnx.Rngs(3))
    # Random (not zero-initialised) weights everywhere, so every layer matters.
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))

    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    t = np.array([0, 17, 999])
    ours = nnx.jit(lambda m, x: m(x, jnp.asarray(t), width=width))(model, x)
    dense = DenseUNet(model, width, groups=4)
    reference = jax.jit(lambda x: dense(x, t))(x)
    np.testing.assert_allclose(ours, reference, rtol=2e-4, atol=2e-5)


def test_widths_differ_and_dropout_is_deterministic_from_its_key():
    config = tiny_config(dropout=0.3)
    network, params = init_network(config, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # break the zero-init output layers
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([5, 500])
    apply = jax.jit(network.apply, static_argnames="width")
    full = apply(params, x, t, width=1.0)
    quarter = apply(params, x, t, width=0.25)
    assert not np.allclose(full, quarter)
    drop_a = apply(params, x, t, width=1.0, dropout_rng=jax.random.key(2))
    drop_b = apply(params, x, t, width=1.0, dropout_rng=jax.random.key(2))
    drop_c = apply(params, x, t, width=1.0, dropout_rng=jax.random.key(3))
    np.testing.assert_array_equal(drop_a, drop_b)
    assert not np.allclose(drop_a, drop_c)
    assert not np.allclose(drop_a, full)


def test_group_count_that_does_not_divide_a_width_is_a_clear_error():
    config = tiny_config(num_groups=32)  # 0.25 * 32 channels = 8 channels < 32 groups
    network, params = abstract_network(config)
    with pytest.raises(ValueError, match="num_groups"):
        width_macs(network, params, 0.25)


def test_cost_command_prints_one_json_object():
    out = subprocess.run([sys.executable, "-m", "ddsm_jax.cost", "--config=configs/cifar10.py"],
                         capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    assert report["params"] == 35_746_307
    assert report["widths"] == [1.0, 0.75, 0.5, 0.25]
    assert set(report["macs"]) == {"1.0", "0.75", "0.5", "0.25"}
    assert report["macs"]["0.5"]["total"] > report["macs"]["0.5"]["conv_linear"] > 1.5e9


def test_bfloat16_compute_stays_close_to_float32_and_returns_float32():
    config = tiny_config()
    network, params = init_network(config, jax.random.key(0))
    config.model.dtype = "bfloat16"
    bf16_network, _ = init_network(config, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, *network.image_shape))
    t = jnp.array([0, 10, 500, 999])
    for width in network.widths:
        exact = jax.jit(partial(network.apply, width=width))(params, x, t)
        approx = jax.jit(partial(bf16_network.apply, width=width))(params, x, t)
        assert approx.dtype == jnp.float32
        error = float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))
        assert 0 < error < 0.05, (width, error)  # bf16 rounding, not a different network


def test_remat_gives_the_same_gradients():
    config = tiny_config()
    network, params = init_network(config, jax.random.key(0))
    config.model.remat = True
    remat_network, _ = init_network(config, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, *network.image_shape))
    t, key = jnp.array([0, 10, 500, 999]), jax.random.key(2)

    def loss(net):
        return lambda p: jnp.mean(net.apply(p, x, t, width=0.5, dropout_rng=key) ** 2)

    assert "remat" not in str(jax.make_jaxpr(jax.grad(loss(network)))(params))
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss(remat_network)))(params))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.jit(jax.grad(loss(network)))(params),
                           jax.jit(jax.grad(loss(remat_network)))(params))


def test_unknown_compute_dtype_is_a_clear_error():
    config = tiny_config()
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="config.model.dtype='float16'"):
        init_network(config, jax.random.key(0))
