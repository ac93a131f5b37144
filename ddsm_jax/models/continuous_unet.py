"""The Missing U's continuous U-Net (Calvo-Ordoñez et al., arXiv 2310.20092): each level's
residual blocks become one neural-ODE block, integrated over [0, 1] by a fixed-step solver.

Following the paper (its Fig. 2) rather than the public code where they differ: the ODE's
vector field is time-conditioned, f(x) = conv3x3(softplus(scale-shift(GroupNorm(conv3x3(
softplus(GroupNorm(x)))), time embedding))), the scale-shift from the diffusion timestep's
embedding (the public code builds it but never feeds it). Levels: an ODE block at each
resolution, a 1x1 convolution to the next level's channels, softplus and a 2x2 average pool
(bilinear halving, exactly, at even sizes); attention where `attn_resolutions` says; an ODE
block and attention in the middle; the decoder upsamples, joins the skip, mixes by a 1x1
convolution and integrates again. Epsilon prediction on our noise schedule, for equal footing.

The solver is torchdiffeq's `rk4` (the 3/8 rule), unrolled in Python so that the MAC tracer sees
every evaluation of f: 4 per step per block. A branch is the fraction of `max_solver_steps`
steps every block takes (`solver_fraction`, static), so the search chooses solver steps per
sampling step as DDSM chooses widths: the paper's network is the one-step branch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ddsm_jax.models import macs
from ddsm_jax.models.slimmable import SlimConv, SlimGroupNorm, SlimLinear, silu
from ddsm_jax.models.unet import AttnBlock, compute_dtype, timestep_embedding

Array = jax.Array
FULL = 1.0  # every layer at its full width: the branches differ in solver steps only


def softplus(x: Array) -> Array:
    macs.record_elementwise("activation", x.size, 3)  # exp, add, log
    return jax.nn.softplus(x)


def rk4_steps(f: Callable[[Array], Array], y: Array, steps: int) -> Array:
    """y(1) of dy/ds = f(y) from y(0) = y, in `steps` equal steps of the 3/8-rule RK4."""
    dt = 1.0 / steps
    for _ in range(steps):
        k1 = f(y)
        k2 = f(y + dt * k1 / 3)
        k3 = f(y + dt * (k2 - k1 / 3))
        k4 = f(y + dt * (k1 - k2 + k3))
        y = y + dt * (k1 + 3 * (k2 + k3) + k4) / 8
        macs.record_elementwise("elementwise", y.size, 16)  # the stage and update arithmetic
    return y


def solver_steps(fraction: float, max_steps: int) -> int:
    """The solver steps per block of branch `fraction`, in 1..max_steps."""
    steps = round(fraction * max_steps)
    if not 0.0 < fraction <= 1.0 or not 1 <= steps <= max_steps or steps != fraction * max_steps:
        raise ValueError(f"solver fraction {fraction} of continuous_unet.max_solver_steps="
                         f"{max_steps}: give k/{max_steps} for whole steps k >= 1")
    return steps


class ODEFunc(nnx.Module):
    """The vector field f(x; time embedding) of one ODE block."""

    def __init__(self, channels: int, temb_channels: int, num_groups: int, *, rngs: nnx.Rngs):
        self.norm1 = SlimGroupNorm(channels, num_groups)
        self.conv1 = SlimConv(channels, channels, 3, rngs=rngs)
        self.norm2 = SlimGroupNorm(channels, num_groups)
        self.temb_proj = SlimLinear(temb_channels, 2 * channels, divisor=1, rngs=rngs)
        self.conv2 = SlimConv(channels, channels, 3, init_scale=1e-5, rngs=rngs)

    def __call__(self, x: Array, temb: Array) -> Array:
        h = self.conv1(softplus(self.norm1(x)), FULL)
        scale, shift = jnp.split(self.temb_proj(silu(temb), FULL), 2, axis=-1)
        h = self.norm2(h) * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
        macs.record_elementwise("elementwise", h.size, 2)
        return self.conv2(softplus(h), FULL)


class ODEBlock(nnx.Module):
    def __init__(self, channels: int, temb_channels: int, num_groups: int, *, rngs: nnx.Rngs):
        self.func = ODEFunc(channels, temb_channels, num_groups, rngs=rngs)

    def __call__(self, x: Array, temb: Array, steps: int) -> Array:
        return rk4_steps(lambda y: self.func(y, temb).astype(y.dtype), x, steps)


def _pool(x: Array) -> Array:
    batch, height, width, channels = x.shape
    macs.record_elementwise("elementwise", x.size, 1)
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


def _upsample(x: Array) -> Array:
    batch, height, width, channels = x.shape
    up = jax.image.resize(x, (batch, 2 * height, 2 * width, channels), "bilinear")
    macs.record_elementwise("elementwise", up.size, 4)
    return up


class ContinuousUNet(nnx.Module):
    """Epsilon from the continuous U-Net, every ODE block taking `solver_fraction` of
    `max_solver_steps` RK4 steps."""

    def __init__(self, *, image_size: int, image_channels: int, ch: int,
                 ch_mult: tuple[int, ...], attn_resolutions: tuple[int, ...], num_groups: int,
                 max_solver_steps: int, dtype: str = "float32", rngs: nnx.Rngs):
        self.image_size, self.image_channels, self.ch = image_size, image_channels, ch
        self.max_solver_steps = max_solver_steps
        self.dtype = compute_dtype(dtype)
        temb = 4 * ch
        self.temb_dense0 = SlimLinear(ch, temb, divisor=1, rngs=rngs)
        self.temb_dense1 = SlimLinear(temb, temb, divisor=1, rngs=rngs)
        channels = [ch * m for m in ch_mult]
        self.head = SlimConv(image_channels, ch, 3, rngs=rngs)
        self.lift = SlimConv(ch, channels[0], 1, rngs=rngs)
        resolutions = [image_size // 2**level for level in range(len(ch_mult))]
        attend = [r in attn_resolutions for r in resolutions]

        def attention(c: int, on: bool) -> AttnBlock | None:
            return AttnBlock(c, num_groups, rngs=rngs) if on else None

        self.down = nnx.List([ODEBlock(c, temb, num_groups, rngs=rngs) for c in channels])
        self.down_attn = nnx.List([attention(c, a) for c, a in zip(channels, attend)])
        self.transitions = nnx.List([SlimConv(a, b, 1, rngs=rngs)
                                     for a, b in itertools.pairwise(channels)])
        self.mid = ODEBlock(channels[-1], temb, num_groups, rngs=rngs)
        self.mid_attn = AttnBlock(channels[-1], num_groups, rngs=rngs)
        # Decoder level l (deepest first): mixes its input with level l's skip down to c_l.
        ups, inputs = [], channels[-1]
        for c in reversed(channels):
            ups.append(SlimConv(inputs + c, c, 1, rngs=rngs))
            inputs = c
        self.mix = nnx.List(ups)
        self.up = nnx.List([ODEBlock(c, temb, num_groups, rngs=rngs) for c in reversed(channels)])
        self.up_attn = nnx.List([attention(c, a) for c, a in zip(reversed(channels),
                                                                 reversed(attend))])
        self.tail = SlimConv(channels[0], image_channels, 1, fixed_out=True, init_scale=1e-5,
                             rngs=rngs)

    def __call__(self, x: Array, t: Array, *, solver_fraction: float = 1.0,
                 dropout_rng: Array | None = None) -> Array:
        del dropout_rng  # no dropout in this network
        chex.assert_shape(x, (None, self.image_size, self.image_size, self.image_channels))
        chex.assert_shape(t, (x.shape[0],))
        steps = solver_steps(solver_fraction, self.max_solver_steps)
        temb = self.temb_dense0(timestep_embedding(t, self.ch).astype(self.dtype), FULL)
        temb = self.temb_dense1(silu(temb), FULL)
        h = softplus(self.lift(softplus(self.head(x.astype(self.dtype), FULL)), FULL))
        skips = []
        for level, block in enumerate(self.down):
            h = block(h, temb, steps)
            if self.down_attn[level] is not None:
                h = self.down_attn[level](h, FULL)
            skips.append(h)
            if level < len(self.transitions):
                h = _pool(softplus(self.transitions[level](h, FULL)))
        h = self.mid_attn(self.mid(h, temb, steps), FULL)
        for level, (mix, block) in enumerate(zip(self.mix, self.up)):
            if level:
                h = _upsample(h)
            h = softplus(mix(jnp.concatenate([h, skips.pop()], axis=-1), FULL))
            h = block(h, temb, steps)
            if self.up_attn[level] is not None:
                h = self.up_attn[level](h, FULL)
        out = self.tail(h, FULL).astype(jnp.float32)
        chex.assert_equal_shape([out, x])
        return out


def build_continuous_unet(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> ContinuousUNet:
    section = config.continuous_unet
    if config.data.image_size % 2 ** (len(section.ch_mult) - 1):
        raise ValueError(f"data.image_size={config.data.image_size} cannot be halved "
                         f"{len(section.ch_mult) - 1} times for continuous_unet.ch_mult="
                         f"{tuple(section.ch_mult)}")
    for fraction in section.solver_fractions:
        solver_steps(float(fraction), section.max_solver_steps)
    return ContinuousUNet(
        image_size=config.data.image_size, image_channels=config.data.channels, ch=section.ch,
        ch_mult=tuple(section.ch_mult), attn_resolutions=tuple(config.model.attn_resolutions),
        num_groups=config.model.num_groups, max_solver_steps=section.max_solver_steps,
        dtype=config.model.dtype, rngs=rngs)
