"""The Missing U's continuous U-Net: its solver against exact and finely integrated solutions,
the whole network against a dense flax reference, its MACs against XLA's."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
from flax import nnx

from ddsm_jax.models.continuous_unet import ODEBlock, build_continuous_unet, rk4_steps, solver_steps
from ddsm_jax.models.cost import SchedulePrices, width_macs
from ddsm_jax.models.network import abstract_network, param_count
from tests.helpers import macs_agreeing_with_xla, tiny_config
from tests.reference_unet import _conv, _linear, _norm
from tests.test_multi_decoder import randomised


def continuous_config():
    config = tiny_config()
    config.strategy = "continuous_unet"
    config.continuous_unet.ch = 8
    config.continuous_unet.ch_mult = (2, 4)
    return config


def test_rk4_converges_to_the_exact_linear_solution_at_fourth_order():
    a = np.array([[-0.5, 1.0], [-1.0, -0.25]])
    y0 = np.array([[1.0, -0.5]])
    exact = y0 @ scipy.linalg.expm(a).T  # y' = A y, row vectors
    errors = [np.abs(np.asarray(rk4_steps(lambda y: y @ jnp.asarray(a).T, jnp.asarray(y0), n))
                     - exact).max() for n in (1, 2, 4)]
    assert errors[0] < 0.02 and errors[0] / errors[1] > 12 and errors[1] / errors[2] > 12


def test_an_ode_block_integrates_its_own_vector_field():
    block = randomised(ODEBlock(8, 16, 4, rngs=nnx.Rngs(0)), seed=3)
    block.func.conv2.kernel[...] = block.func.conv2.kernel[...] * 0.3  # a smooth, tame field
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
    temb = jax.random.normal(jax.random.key(2), (2, 16))
    f = jax.jit(lambda y: block.func(y, temb))
    fine = scipy.integrate.solve_ivp(
        lambda s, y: np.asarray(f(jnp.asarray(y.reshape(x.shape), jnp.float32))).ravel(),
        (0.0, 1.0), np.asarray(x, np.float64).ravel(), rtol=1e-9, atol=1e-9).y[:, -1]
    errors = [np.abs(np.asarray(block(x, temb, n)).ravel() - fine).max() for n in (1, 2)]
    assert errors[1] < errors[0] < 0.05 * np.abs(fine).max()


class DenseContinuousUNet:
    """The continuous U-Net written out with flax's own dense layers from the same weights."""

    def __init__(self, model, groups: int):
        self.model, self.groups = model, groups
        copy = lambda conv: _conv(conv, *conv.kernel[...].shape[2:])
        self.copy = copy

    def func(self, func, y, temb):
        c = y.shape[-1]
        h = self.copy(func.conv1)(jax.nn.softplus(_norm(func.norm1, c, self.groups)(y)))
        scale, shift = jnp.split(_linear(func.temb_proj, *func.temb_proj.kernel[...].shape)(
            nnx.silu(temb)), 2, axis=-1)
        h = _norm(func.norm2, c, self.groups)(h) * (1 + scale[:, None, None]) + shift[:, None, None]
        return self.copy(func.conv2)(jax.nn.softplus(h))

    def ode(self, block, y, temb, steps):
        f = lambda y: self.func(block.func, y, temb)
        for _ in range(steps):
            k1 = f(y)
            k2 = f(y + k1 / (3 * steps))
            k3 = f(y + (k2 - k1 / 3) / steps)
            k4 = f(y + (k1 - k2 + k3) / steps)
            y = y + (k1 + 3 * k2 + 3 * k3 + k4) / (8 * steps)
        return y

    def attention(self, attn, h):
        c = h.shape[-1]
        n = _norm(attn.norm, c, self.groups)(h)
        q, k, v = (self.copy(attn.q)(n), self.copy(attn.k)(n), self.copy(attn.v)(n))
        b, height, width, _ = q.shape
        w = jnp.einsum("bhwc,bHWc->bhwHW", q, k).reshape(b, height, width, -1) / math.sqrt(c)
        w = jax.nn.softmax(w, axis=-1).reshape(b, height, width, height, width)
        return h + self.copy(attn.proj)(jnp.einsum("bhwHW,bHWc->bhwc", w, v))

    def __call__(self, x, t, steps):
        m = self.model
        freqs = np.exp(-math.log(10000.0) * np.arange(0, m.ch, 2) / m.ch)
        angles = np.asarray(t, np.float64)[:, None] * freqs[None, :]
        emb = np.zeros((len(t), m.ch))
        emb[:, 0::2], emb[:, 1::2] = np.sin(angles), np.cos(angles)
        linear = lambda layer: _linear(layer, *layer.kernel[...].shape)
        temb = linear(m.temb_dense1)(nnx.silu(linear(m.temb_dense0)(jnp.asarray(emb, jnp.float32))))
        h = jax.nn.softplus(self.copy(m.lift)(jax.nn.softplus(self.copy(m.head)(x))))
        skips = []
        for level, block in enumerate(m.down):
            h = self.ode(block, h, temb, steps)
            if m.down_attn[level] is not None:
                h = self.attention(m.down_attn[level], h)
            skips.append(h)
            if level < len(m.transitions):
                h = jax.nn.softplus(self.copy(m.transitions[level])(h))
                h = (h[:, 0::2, 0::2] + h[:, 1::2, 0::2] + h[:, 0::2, 1::2] + h[:, 1::2, 1::2]) / 4
        h = self.attention(m.mid_attn, self.ode(m.mid, h, temb, steps))
        for level, (mix, block) in enumerate(zip(m.mix, m.up)):
            if level:
                h = upsample_half_pixel(upsample_half_pixel(h, 1), 2)
            h = jax.nn.softplus(self.copy(mix)(jnp.concatenate([h, skips.pop()], axis=-1)))
            h = self.ode(block, h, temb, steps)
            if m.up_attn[level] is not None:
                h = self.attention(m.up_attn[level], h)
        return self.copy(m.tail)(h)


def upsample_half_pixel(x, axis):
    """Bilinear doubling along `axis` with half-pixel centres (PyTorch's align_corners=False):
    output 2i is 3/4 of input i and 1/4 of input i-1, output 2i+1 the same with i+1, the edges
    repeated."""
    before = jnp.concatenate([jnp.take(x, jnp.array([0]), axis=axis),
                              jnp.take(x, jnp.arange(x.shape[axis] - 1), axis=axis)], axis=axis)
    after = jnp.concatenate([jnp.take(x, jnp.arange(1, x.shape[axis]), axis=axis),
                             jnp.take(x, jnp.array([x.shape[axis] - 1]), axis=axis)], axis=axis)
    pairs = jnp.stack([0.75 * x + 0.25 * before, 0.75 * x + 0.25 * after], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] *= 2
    return pairs.reshape(shape)


def test_the_network_equals_a_dense_reference():
    fraction = 0.5  # one RK4 step per block (two: the solver test above, and the MACs)
    model = randomised(build_continuous_unet(continuous_config(), nnx.Rngs(1)), seed=4)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = np.array([3, 800])
    ours = nnx.jit(lambda m, x: m(x, jnp.asarray(t), solver_fraction=fraction))(model, x)
    dense = DenseContinuousUNet(model, groups=4)
    reference = jax.jit(lambda x: dense(x, t, solver_steps(fraction, 2)))(x)
    np.testing.assert_allclose(ours, reference, rtol=5e-4, atol=5e-4 * np.abs(reference).max())


def test_macs_agree_with_xla_and_count_every_solver_evaluation():
    network, params = abstract_network(continuous_config())
    assert network.branch_arg == "solver_fraction" and network.widths == (1.0, 0.5)
    totals = {fraction: macs_agreeing_with_xla(network, params, 0.02,
                                               solver_fraction=fraction).conv_linear
              for fraction in network.widths}
    # Two solver steps evaluate every block's vector field 8 times, one step 4 times; the rest
    # (head, transitions, attention, mixing, tail) is shared. A field: two 3x3 convolutions
    # and the time embedding's (32 channels) scale-shift; blocks at 8x8 x 16 (first level, last
    # decoder level) and 4x4 x 32 (second level, middle, first decoder level).
    field = [2 * r * r * 9 * c * c + 32 * 2 * c for r, c in [(8, 16), (4, 32), (4, 32), (4, 32),
                                                                (8, 16)]]
    assert totals[1.0] - totals[0.5] == 4 * sum(field)
    unet_network, unet_params = abstract_network(tiny_config())
    assert param_count(params) < param_count(unet_params) / 2
    # Its MACs ratios, as every strategy's, are against the full U-Net, not its own full branch.
    prices = SchedulePrices.of(network, params, [999, 500, 0], continuous_config())
    unet = width_macs(unet_network, unet_params, 1.0).total
    assert prices.reference == unet
    assert prices([1, 1, 1])["macs_ratio"] == width_macs(
        network, params, solver_fraction=0.5).total / unet


def test_solver_fractions_must_give_whole_steps():
    assert solver_steps(0.5, 2) == 1 and solver_steps(1.0, 4) == 4
    config = continuous_config()
    config.continuous_unet.solver_fractions = (1.0, 0.3)
    with pytest.raises(ValueError, match="solver fraction 0.3 .* k/2"):
        abstract_network(config)
