"""NHWC convolution whose backward pass stays fast on XLA:CPU.

XLA:CPU computes a convolution's weight gradient as one convolution that contracts over the
batch. With YNNPACK's kernels its speed fell as the batch grew: the CIFAR-10 U-Net's full-width
train step at batch 32 ran at 61 GFLOP/s with it and at 82 with the gradient summed over chunks
of 4 images (`python -m benchmarks.train_step --weight_grad_chunks=0,4`). XLA's own kernels,
which the package now chooses (`utils/xla_flags.py`), are faster whole, so `weight_grad_chunk`,
which turns that split on, defaults to 0. Accelerators' convolutions do not need it, so it
applies to CPU programs only, chosen as a program is lowered (`jax.lax.platform_dependent`), not
by the backend of the process that traces it: a TPU program compiled ahead of time on a CPU host
keeps XLA's own convolution.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

# Chunks per weight gradient at most: each is its own convolution in the compiled program.
MAX_CHUNKS = 16
# Smaller feature maps keep one convolution: split, an 8x8 layer's weight gradient ran at
# under half its whole-batch speed (`python -m benchmarks.conv_gradients`).
MIN_SPLIT_PIXELS = 16 * 16


def xla_conv(x: Array, kernel: Array, stride: int = 1) -> Array:
    """XLA's own convolution, same-padded PyTorch-style (also for stride 2), NHWC and HWIO."""
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad), (pad, pad)],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def num_chunks(batch: int, chunk: int, devices: int) -> int:
    """Chunks of about `chunk` images per device that divide the batch (1: no split)."""
    if chunk <= 0 or batch % devices:
        return 1
    per_device = batch // devices
    most = min(MAX_CHUNKS, per_device // chunk)
    return max([n for n in range(1, most + 1) if per_device % n == 0], default=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _chunked_grad_conv(x: Array, kernel: Array, stride: int, chunks: int) -> Array:
    return xla_conv(x, kernel, stride)


def _forward(x: Array, kernel: Array, stride: int, chunks: int):
    return xla_conv(x, kernel, stride), (x, kernel)


def _backward(stride: int, chunks: int, residuals: tuple[Array, Array], dy: Array):
    x, kernel = residuals
    dx = jax.vjp(lambda x: xla_conv(x, kernel, stride), x)[1](dy)[0]
    # Chunk j holds images j, j + chunks, ...: a reshape that keeps every chunk spread evenly
    # over the devices a batch-sharded step splits the batch across, so no chunk moves data.
    xs = x.reshape(-1, chunks, *x.shape[1:])
    dys = dy.reshape(-1, chunks, *dy.shape[1:])
    dk = jnp.zeros(kernel.shape, jnp.float32)
    for j in range(chunks):
        grad = jax.vjp(lambda k, j=j: xla_conv(xs[:, j], k, stride), kernel)[1](dys[:, j])[0]
        dk = dk + grad.astype(jnp.float32)
    return dx, dk.astype(kernel.dtype)


_chunked_grad_conv.defvjp(_forward, _backward)


def conv2d(x: Array, kernel: Array, *, stride: int = 1, weight_grad_chunk: int = 0) -> Array:
    """`xla_conv`, with a 1x1 kernel as a matmul and, on CPU, chunked weight gradients."""
    chex.assert_rank([x, kernel], 4)
    chex.assert_axis_dimension(kernel, 2, x.shape[-1])
    if kernel.shape[0] == 1 and stride == 1:
        # A matmul over channels; written as one, its weight gradient is a matmul too, which ran
        # 2-3x faster than XLA:CPU's 1x1 weight-gradient convolution (benchmarks.conv_gradients).
        return x @ kernel[0, 0]
    chunks = 1
    if x.shape[1] * x.shape[2] >= MIN_SPLIT_PIXELS:
        chunks = num_chunks(x.shape[0], weight_grad_chunk, jax.device_count())
    if chunks == 1:
        return xla_conv(x, kernel, stride)
    return jax.lax.platform_dependent(
        x, kernel, cpu=lambda x, kernel: _chunked_grad_conv(x, kernel, stride, chunks),
        default=lambda x, kernel: xla_conv(x, kernel, stride))
