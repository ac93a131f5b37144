"""Forward, input-gradient and weight-gradient speed of the CIFAR-10 U-Net's 3x3 convolutions.

    python -m benchmarks.conv_gradients [--batch=8]

The train step is almost all convolutions; this shows which of the three products of each one
falls short of the matmul peak on this machine (each compiled and warmed up, median of
`--repeats`), which is what limits `benchmarks.train_step`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import conv3x3, matmul_peak_gflops, median_seconds, report

_BATCH = flags.DEFINE_integer("batch", 8, "Images per call.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per product.")

# (resolution, input channels, output channels, what) of the full-width CIFAR-10 network.
SHAPES = [(32, 128, 128, "level 0 res block"), (32, 384, 128, "up level 0, skip concatenated"),
          (32, 256, 256, "upsampling 16 -> 32"), (16, 256, 256, "level 1 res block"),
          (8, 256, 256, "level 2 res block"), (32, 32, 32, "width 0.25, level 0")]


def main(argv: list[str]) -> None:
    del argv
    peak = matmul_peak_gflops()
    forward = jax.jit(conv3x3)
    input_grad = jax.jit(lambda x, k, dy: jax.vjp(lambda x: conv3x3(x, k), x)[1](dy)[0])
    weight_grad = jax.jit(lambda x, k, dy: jax.vjp(lambda k: conv3x3(x, k), k)[1](dy)[0])
    rows = []
    for size, c_in, c_out, what in SHAPES:
        x = jax.random.normal(jax.random.key(0), (_BATCH.value, size, size, c_in), jnp.float32)
        kernel = jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out), jnp.float32)
        dy = jax.random.normal(jax.random.key(2), (_BATCH.value, size, size, c_out), jnp.float32)
        flops = 2 * _BATCH.value * size * size * 9 * c_in * c_out
        row = {"shape": f"{size}x{size} {c_in}->{c_out}", "layer": what}
        for name, run in [("forward", functools.partial(forward, x, kernel)),
                          ("input_grad", functools.partial(input_grad, x, kernel, dy)),
                          ("weight_grad", functools.partial(weight_grad, x, kernel, dy))]:
            seconds, _ = median_seconds(run, _REPEATS.value)
            row[name] = flops / seconds / 1e9
        rows.append(row)
    report(rows, [("shape", "shape", "s"), ("layer", "layer", "s"),
                  ("forward", "forward GFLOP/s", ".0f"), ("input_grad", "input grad", ".0f"),
                  ("weight_grad", "weight grad", ".0f")],
           notes=[f"batch {_BATCH.value}; float32 matmul peak measured now: {peak:.1f} GFLOP/s"])


if __name__ == "__main__":
    app.run(main)
