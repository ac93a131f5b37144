"""Forward, input-gradient and weight-gradient speed of the CIFAR-10 U-Net's convolutions.

    python -m benchmarks.conv_gradients [--batch=8]

The train step is almost all convolutions; this shows which of the three products of each one
falls short of the matmul peak on this machine (each compiled and warmed up, median of
`--repeats`), which is what limits `benchmarks.train_step`. The last two columns time all three
products in one program, as training runs them: the model's `conv2d`, and for 1x1 kernels the
same product written as a matmul over channels, the alternative `conv2d` once used.
"""

from __future__ import annotations

import functools

import jax
from absl import app, flags

from benchmarks.common import matmul_peak_gflops, median_seconds, report
from ddsm_jax.models.conv import conv2d

_BATCH = flags.DEFINE_integer("batch", 8, "Images per call.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per product.")

# (kernel, resolution, input channels, output channels, what) of the full-width CIFAR-10 network.
SHAPES = [(3, 32, 128, 128, "level 0 res block"),
          (3, 32, 384, 128, "up level 0, skip concatenated"),
          (3, 32, 256, 256, "upsampling 16 -> 32"), (3, 16, 256, 256, "level 1 res block"),
          (3, 8, 256, 256, "level 2 res block"), (3, 32, 32, 32, "width 0.25, level 0"),
          (1, 32, 384, 128, "up level 0 shortcut"), (1, 16, 256, 256, "attention q/k/v"),
          (1, 16, 512, 256, "up level 1 shortcut"), (1, 8, 256, 256, "width 1, level 2")]


def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return x @ kernel[0, 0]


def _train(conv):
    """Forward and both gradients, as one train step computes them."""
    def products(x, k, dy):
        y, vjp = jax.vjp(conv, x, k)
        return y, vjp(dy)
    return jax.jit(products)


def main(argv: list[str]) -> None:
    del argv
    peak = matmul_peak_gflops()
    products = [("forward", jax.jit(lambda x, k, dy: conv2d(x, k))),
                ("input_grad", jax.jit(lambda x, k, dy: jax.vjp(lambda x: conv2d(x, k), x)[1](dy)[0])),
                ("weight_grad", jax.jit(lambda x, k, dy: jax.vjp(lambda k: conv2d(x, k), k)[1](dy)[0])),
                ("train", _train(conv2d)), ("train_matmul", _train(_matmul))]
    rows = []
    for size, resolution, c_in, c_out, what in SHAPES:
        x = jax.random.normal(jax.random.key(0), (_BATCH.value, resolution, resolution, c_in))
        kernel = jax.random.normal(jax.random.key(1), (size, size, c_in, c_out))
        dy = jax.random.normal(jax.random.key(2), (_BATCH.value, resolution, resolution, c_out))
        flops = 2 * _BATCH.value * resolution * resolution * size * size * c_in * c_out
        row = {"shape": f"{size}x{size} at {resolution}x{resolution} {c_in}->{c_out}",
               "layer": what}
        for name, product in products:
            if name == "train_matmul" and size != 1:
                continue
            seconds, _ = median_seconds(functools.partial(product, x, kernel, dy), _REPEATS.value)
            row[name] = flops * (3 if name.startswith("train") else 1) / seconds / 1e9
        rows.append(row)
    report(rows, [("shape", "shape", "s"), ("layer", "layer", "s"),
                  ("forward", "forward GFLOP/s", ".0f"), ("input_grad", "input grad", ".0f"),
                  ("weight_grad", "weight grad", ".0f"), ("train", "all three", ".0f"),
                  ("train_matmul", "all three as matmul", ".0f")],
           notes=[f"batch {_BATCH.value}; float32 matmul peak measured now: {peak:.1f} GFLOP/s"])


if __name__ == "__main__":
    app.run(main)
