"""Speed per MAC of one 3x3 convolution against its channel count, on this machine.

    python -m benchmarks.conv_channels [--resolution=32] [--batch=4] [--channels=8,16,...]
                                       [--backends=ynnpack,xla]

Narrow widths save time only as far as the convolution kernels stay efficient at their channel
counts; this prints GFLOP/s per count (compiled and warmed up first, median of `--repeats`),
which explains the saving ratios of `benchmarks/sampling.py`. `--backends` times the same
convolution compiled for each of XLA:CPU's kernels, taking turns: YNNPACK's (jaxlib's default)
and XLA's own, which ddsm_jax chooses (`ddsm_jax/utils/xla_flags.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import median_seconds, report
from ddsm_jax.models.conv import conv2d

_RESOLUTION = flags.DEFINE_integer("resolution", 32, "Image height and width.")
_BATCH = flags.DEFINE_integer("batch", 4, "Images per call.")
_CHANNELS = flags.DEFINE_list("channels", ["8", "16", "32", "64", "96", "128", "192", "256"],
                              "Channel counts (in = out).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per count.")
_BACKENDS = flags.DEFINE_list("backends", ["default"],
                              "Convolution kernels: default (this process's XLA_FLAGS), "
                              "ynnpack or xla.")

# Compiler options that give the one convolution of the program to each kernel.
_BACKEND_OPTIONS = {"default": {},
                    "ynnpack": {"xla_cpu_experimental_ynn_fusion_type":
                                "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"},
                    "xla": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def main(argv: list[str]) -> None:
    del argv
    unknown = set(_BACKENDS.value) - set(_BACKEND_OPTIONS)
    if unknown:
        raise app.UsageError(f"--backends: unknown {sorted(unknown)}; choose from "
                             f"{list(_BACKEND_OPTIONS)}")
    size, batch = _RESOLUTION.value, _BATCH.value
    rows = []
    for channels in map(int, _CHANNELS.value):
        x = jax.random.normal(jax.random.key(0), (batch, size, size, channels), jnp.float32)
        kernel = jax.random.normal(jax.random.key(1), (3, 3, channels, channels), jnp.float32)
        flops = 2 * batch * size * size * 9 * channels * channels
        for backend in _BACKENDS.value:
            conv = jax.jit(conv2d).lower(x, kernel).compile(_BACKEND_OPTIONS[backend])
            seconds, _ = median_seconds(functools.partial(conv, x, kernel), _REPEATS.value)
            rows.append({"channels": channels, "backend": backend, "resolution": size,
                         "batch": batch, "seconds": seconds, "ms": seconds * 1e3,
                         "gflops_per_sec": flops / seconds / 1e9})
    report(rows, [("channels", "channels", "d"), ("backend", "kernel", "s"), ("ms", "ms", ".2f"),
                  ("gflops_per_sec", "GFLOP/s", ".1f")],
           notes=[f"{size}x{size}, batch {batch}, in = out channels"])


if __name__ == "__main__":
    app.run(main)
