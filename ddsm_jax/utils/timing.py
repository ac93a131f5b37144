"""Wall-clock timing of compiled JAX calls: warmed up first, then the median of repeats, so
that neither compilation nor one noisy run (these machines are shared) decides a figure."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def median_seconds(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    """Median seconds of `fn(*args)` over `repeats` runs after one untimed (compiling) run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
