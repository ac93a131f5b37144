"""Speed per MAC of one 3x3 convolution against its channel count, on this machine.

    python -m benchmarks.conv_channels [--resolution=32] [--batch=4] [--channels=8,16,...]

Narrow widths save time only as far as the convolution kernels stay efficient at their channel
counts; this prints GFLOP/s per count (compiled and warmed up first, median of `--repeats`),
which explains the saving ratios of `benchmarks/sampling.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import median_seconds, report
from ddsm_jax.models.conv import xla_conv

_RESOLUTION = flags.DEFINE_integer("resolution", 32, "Image height and width.")
_BATCH = flags.DEFINE_integer("batch", 4, "Images per call.")
_CHANNELS = flags.DEFINE_list("channels", ["8", "16", "32", "64", "96", "128", "192", "256"],
                              "Channel counts (in = out).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per count.")


def main(argv: list[str]) -> None:
    del argv
    conv = jax.jit(xla_conv)
    size, batch = _RESOLUTION.value, _BATCH.value
    rows = []
    for channels in map(int, _CHANNELS.value):
        x = jax.random.normal(jax.random.key(0), (batch, size, size, channels), jnp.float32)
        kernel = jax.random.normal(jax.random.key(1), (3, 3, channels, channels), jnp.float32)
        seconds, _ = median_seconds(functools.partial(conv, x, kernel), _REPEATS.value)
        flops = 2 * batch * size * size * 9 * channels * channels
        rows.append({"channels": channels, "resolution": size, "batch": batch,
                     "seconds": seconds, "ms": seconds * 1e3,
                     "gflops_per_sec": flops / seconds / 1e9})
    report(rows, [("channels", "channels", "d"), ("ms", "ms", ".2f"),
                  ("gflops_per_sec", "GFLOP/s", ".1f")],
           notes=[f"{size}x{size}, batch {batch}, in = out channels"])


if __name__ == "__main__":
    app.run(main)
