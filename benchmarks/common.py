"""What every benchmark shares: steady-state timing, this machine's matmul peak, the report."""

from __future__ import annotations

import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from ddsm_jax.utils.compile_counter import CompileCounter


def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, CompileCounter]:
    """Median wall clock of `repeats` calls of `run()` after one warm-up call, and the
    compilations that warm-up made (steady state only is timed)."""
    with CompileCounter() as compiles:
        jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times), compiles


def matmul_peak_gflops(sizes: Sequence[int] = (1024, 2048), repeats: int = 10,
                       dtype: str = "float32") -> float:
    """The best matmul rate in `dtype` over `sizes`: the ceiling the model's GFLOP/s is read
    against, measured in the same run because these machines are shared and noisy."""
    best = 0.0
    matmul = jax.jit(jnp.matmul)
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        seconds, _ = median_seconds(functools.partial(matmul, a, b), repeats)
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The host CPU's name, family/model and widest vector unit: two machines sold as the same
    "2-core AMD EPYC" ran the CIFAR-10 step a quarter apart and rounded differently."""
    try:
        first = cpuinfo.read_text().split("\n\n")[0]
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = {key.strip(): value.strip() for key, _, value in
                  (line.partition(":") for line in first.splitlines())}
    flags = fields.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')}, {vector})")


def machine() -> str:
    devices = jax.devices()
    return (f"{platform.machine()} {cpu_model()}; {devices[0].platform} x{len(devices)} "
            f"({devices[0].device_kind}), jax {jax.__version__}")


def report(rows: list[dict], columns: Sequence[tuple[str, str, str]],
           notes: Sequence[str] = ()) -> None:
    """The command, the machine, a table (`columns`: key, header, format) and one JSON line per
    row, so a figure can always be traced back to the command that printed it."""
    print(f"$ python -m benchmarks.{Path(sys.argv[0]).stem} {' '.join(sys.argv[1:])}".rstrip())
    print(f"# {machine()}")
    for note in notes:
        print(f"# {note}")
    cells = [[f"{'' if row.get(key) is None else format(row[key], fmt)}" for key, _, fmt in columns]
             for row in rows]
    widths = [max([len(header)] + [len(line[i]) for line in cells])
              for i, (_, header, _) in enumerate(columns)]
    print("  ".join(f"{header:>{w}}" for (_, header, _), w in zip(columns, widths)))
    for line in cells:
        print("  ".join(f"{cell:>{w}}" for cell, w in zip(line, widths)))
    for row in rows:
        print(json.dumps(row))
