"""Speed per MAC of one 3x3 convolution against its channel count, on this machine.

    python -m benchmarks.conv_channels [--resolution=32] [--batch=4] [--channels=8,16,...]

Narrow widths save time only as far as the convolution kernels stay efficient at their channel
counts; this prints GFLOP/s per count (compiled and warmed up first, median of `--repeats`),
which explains the saving ratios of `benchmarks/sampling.py`.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

_RESOLUTION = flags.DEFINE_integer("resolution", 32, "Image height and width.")
_BATCH = flags.DEFINE_integer("batch", 4, "Images per call.")
_CHANNELS = flags.DEFINE_list("channels", ["8", "16", "32", "64", "96", "128", "192", "256"],
                              "Channel counts (in = out).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per count.")


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1), (1, 1)],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main(argv: list[str]) -> None:
    del argv
    conv = jax.jit(_conv)
    size, batch = _RESOLUTION.value, _BATCH.value
    print(" ".join(sys.argv))
    print(f"{'channels':>8} {'ms':>8} {'GFLOP/s':>8}")
    rows = []
    for channels in map(int, _CHANNELS.value):
        x = jax.random.normal(jax.random.key(0), (batch, size, size, channels), jnp.float32)
        kernel = jax.random.normal(jax.random.key(1), (3, 3, channels, channels), jnp.float32)
        conv(x, kernel).block_until_ready()
        times = []
        for _ in range(_REPEATS.value):
            start = time.perf_counter()
            conv(x, kernel).block_until_ready()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        flops = 2 * batch * size * size * 9 * channels * channels
        rows.append({"channels": channels, "resolution": size, "batch": batch,
                     "seconds": seconds, "gflops_per_sec": flops / seconds / 1e9})
        print(f"{channels:>8} {seconds * 1e3:>8.2f} {rows[-1]['gflops_per_sec']:>8.1f}")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
