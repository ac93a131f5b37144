"""The model's convolution: XLA's, with PyTorch's padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddsm_jax.models.conv import conv2d


def _direct_conv(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    """A loop over kernel taps in numpy, padded by kernel // 2 as torch.nn.Conv2d(padding=k//2)."""
    size = kernel.shape[0]
    pad = size // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_size = (x.shape[1] + 2 * pad - size) // stride + 1
    out = np.zeros((x.shape[0], out_size, out_size, kernel.shape[-1]), np.float64)
    for i in range(size):
        for j in range(size):
            window = padded[:, i:i + stride * out_size:stride, j:j + stride * out_size:stride]
            out += window @ kernel[i, j]
    return out


@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (3, 2), (1, 1)])
def test_convolution_matches_a_direct_sum_over_taps(kernel_size, stride):
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 7, 7, 16)), np.float64)
    kernel = np.asarray(jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 16, 8)),
                        np.float64)
    np.testing.assert_allclose(conv2d(jnp.float32(x), jnp.float32(kernel), stride=stride),
                               _direct_conv(x, kernel, stride), rtol=1e-4, atol=1e-4)
