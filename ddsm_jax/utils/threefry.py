"""Large random draws on a CPU several times faster: threefry unrolled, not in a rolled loop.

Every `jax.random` draw is threefry2x32. On a CPU jax 0.10 lowers it as a `fori_loop` of five
iterations (GPUs and TPUs get it unrolled), and XLA:CPU runs each iteration as its own passes
over the counters: a dropout mask of (8, 32, 32, 128) took 5.1 ms here, unrolled into one fused
loop 0.6 ms (`python -m benchmarks.random_bits`); unrolled, the CIFAR-10 sandwich train step
took ~5% less time. An unrolled draw costs compilation (with every draw unrolled, that step
compiled in some 6 s more), so only draws of at least `UNROLL_FROM` numbers get it, where the
time saved repays it within a few hundred steps; smaller ones (the digits network's noise, the
tests' tiny networks) keep the loop. Both compute the same function of key and counter, so
every draw and every result stays bit for bit the same (tests/test_threefry.py checks known
answers). The switch uses jax internals, so it is made only on the jax release it was tested
with.
"""

from __future__ import annotations

import importlib.metadata
import math

KNOWN_JAX = ((0, 10),)
UNROLL_FROM = 2**16  # numbers per draw


def unroll_threefry_on_cpu() -> bool:
    """Registers the size-dependent CPU lowering; False where this jax is not a known release."""
    if _jax_release() not in KNOWN_JAX:
        return False
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32
        primitive = threefry2x32.threefry2x32_p
        unrolled = threefry2x32._threefry2x32_lowering_rule
        rolled = threefry2x32._threefry2x32_cpu_lowering_rule
    except (ImportError, AttributeError):
        return False

    def lowering(ctx, *args):
        large = math.prod(ctx.avals_out[0].shape) >= UNROLL_FROM
        return (unrolled if large else rolled)(ctx, *args)

    mlir.register_lowering(primitive, lowering, platform="cpu")
    return True


def _jax_release() -> tuple[int, int] | None:
    try:
        major, minor = importlib.metadata.version("jax").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
