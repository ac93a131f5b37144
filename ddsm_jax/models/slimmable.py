"""Slimmable layers: full-width weights, of which a width-w call uses the leading slice.

Output channels follow `make_divisible(C * w, divisor)`; input channels follow the incoming
tensor. This is the layout of the DDSM release, so its checkpoints map onto these parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ddsm_jax.models import macs
from ddsm_jax.models.conv import conv2d

Array = jax.Array


def make_divisible(value: float, divisor: int) -> int:
    """MobileNet rounding: nearest multiple of `divisor`, never more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def slim_channels(full: int, width: float, divisor: int) -> int:
    if not 0.0 < width <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width}")
    return min(full, make_divisible(full * width, divisor))


def _xavier(scale: float) -> nnx.Initializer:
    """Xavier-uniform with a gain, as the DDPM U-Net initialises its layers."""
    return jax.nn.initializers.variance_scaling(scale**2, "fan_avg", "uniform")


def _valid_taps(in_size: int, out_size: int, kernel: int, stride: int, pad: int) -> int:
    """Kernel taps along one axis that land inside the input rather than on padding."""
    return sum(1 for i in range(out_size) for k in range(kernel)
               if 0 <= i * stride + k - pad < in_size)


class SlimConv(nnx.Module):
    """NHWC convolution with a HWIO kernel; `fixed_out` keeps all outputs (the image head)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 divisor: int = 8, fixed_out: bool = False, init_scale: float = 1.0,
                 rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(_xavier(init_scale)(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32))
        self.out_channels = out_channels
        self.stride = stride
        self.divisor = divisor
        self.fixed_out = fixed_out

    def channels(self, width: float) -> int:
        if self.fixed_out:
            return self.out_channels
        return slim_channels(self.out_channels, width, self.divisor)

    def __call__(self, x: Array, width: float) -> Array:
        c_in, c_out = x.shape[-1], self.channels(width)
        kernel = self.kernel[...][:, :, :c_in, :c_out].astype(x.dtype)
        y = conv2d(x, kernel, stride=self.stride)
        y = y + self.bias[...][:c_out].astype(x.dtype)
        batch, height, width_px, _ = y.shape
        size = kernel.shape[0]
        pad = size // 2
        dense_taps = height * width_px * size**2
        valid_taps = (_valid_taps(x.shape[1], height, size, self.stride, pad)
                      * _valid_taps(x.shape[2], width_px, size, self.stride, pad))
        macs.record("conv", batch * dense_taps * c_in * c_out)
        macs.record_conv_padding(batch * (dense_taps - valid_taps) * c_in * c_out)
        macs.record_elementwise("elementwise", y.size, 1)  # bias
        return y


class SlimLinear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, divisor: int, rngs: nnx.Rngs):
        shape = (in_features, out_features)
        self.kernel = nnx.Param(_xavier(1.0)(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        self.out_features = out_features
        self.divisor = divisor

    def channels(self, width: float) -> int:
        return slim_channels(self.out_features, width, self.divisor)

    def __call__(self, x: Array, width: float) -> Array:
        c_in, c_out = x.shape[-1], self.channels(width)
        y = x @ self.kernel[...][:c_in, :c_out].astype(x.dtype) + self.bias[...][:c_out].astype(x.dtype)
        macs.record("linear", math.prod(x.shape[:-1]) * c_in * c_out)
        macs.record_elementwise("elementwise", y.size, 1)
        return y


class SlimGroupNorm(nnx.Module):
    """GroupNorm whose group count stays fixed while gamma/beta are sliced to the input width.

    The statistics are reduced over the pixels per channel first, then over each group's
    channels: XLA:CPU vectorises a reduction that keeps the channels as the minor axis, and runs
    one over (pixels, a group's channels) 4-6x slower at 32x32 with 96-128 channels. The
    normalisation and gamma/beta are then folded into one scale and shift per image and channel,
    so the feature map is read twice for the statistics (two-pass: the variance is of the
    centred values) and once for the output, with no centred or normalised copy in between:
    forward and backward 1.3-2.5x faster than normalising in steps at the CIFAR-10 U-Net's
    shapes (timed side by side, docs/performance.md; `python -m benchmarks.vs_torch --layers`
    times the gradient against torch's).
    """

    def __init__(self, channels: int, num_groups: int, epsilon: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.num_groups = num_groups
        self.epsilon = epsilon

    def __call__(self, x: Array) -> Array:
        batch, height, width_px, channels = x.shape
        if channels % self.num_groups:
            raise ValueError(
                f"GroupNorm with {self.num_groups} groups cannot normalise {channels} channels; "
                f"choose model.num_groups dividing every slimmed channel count")
        per_group = channels // self.num_groups
        count = height * width_px * per_group

        def group_mean(channel_sums: Array) -> Array:  # (batch, channels), each group's mean
            sums = channel_sums.reshape(batch, self.num_groups, per_group).sum(axis=-1)
            return jnp.repeat(sums / count, per_group, axis=-1)

        x32 = x.astype(jnp.float32)
        mean = group_mean(x32.sum(axis=(1, 2)))
        var = group_mean(jnp.square(x32 - mean[:, None, None, :]).sum(axis=(1, 2)))
        scale = jax.lax.rsqrt(var + self.epsilon) * self.scale[...][:channels]
        shift = self.bias[...][:channels] - mean * scale
        y = x32 * scale[:, None, None, :] + shift[:, None, None, :]
        macs.record_elementwise("norm", x.size, 6)  # sum, centre, square, sum, scale, shift
        return y.astype(x.dtype)


def silu(x: Array) -> Array:
    macs.record_elementwise("activation", x.size, 4)  # exp, add, divide, multiply
    return jax.nn.silu(x)
