"""NHWC convolution as the slimmable layers compute it on every platform."""

from __future__ import annotations

import chex
import jax

Array = jax.Array


def conv2d(x: Array, kernel: Array, *, stride: int = 1) -> Array:
    """XLA's convolution, same-padded PyTorch-style (also for stride 2), NHWC and HWIO.

    1x1 kernels too: with XLA:CPU's own convolutions (`utils/xla_flags.py`) a 1x1 convolution's
    forward and two gradients ran on a par with, or faster than, the same product written as a
    matmul over channels (`python -m benchmarks.conv_gradients`, last two columns), and the
    CIFAR-10 sandwich train step took about 5% less time than with matmuls.
    """
    chex.assert_rank([x, kernel], 4)
    chex.assert_axis_dimension(kernel, 2, x.shape[-1])
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad), (pad, pad)],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
