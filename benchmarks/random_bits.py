"""A dropout mask and a dropout drawn with jax's CPU lowering of threefry and with the package's.

    python -m benchmarks.random_bits

jax lowers threefry2x32 on a CPU as a loop of five rounds; `ddsm_jax.utils.threefry` gives draws
of at least `UNROLL_FROM` numbers the unrolled lowering GPUs and TPUs get. Both compile in this
one process, alternating per shape (compiled and warmed up first, median of `--repeats`), and the
bits are checked equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax._src.interpreters import mlir
from jax._src.random import threefry2x32

from benchmarks.common import median_seconds, report
from ddsm_jax.utils import threefry

_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed runs per row.")
_SHAPES = ((8, 32, 32, 128), (8, 32, 32, 256), (8, 16, 16, 256), (64, 8, 8, 32))


def _lowered_with(rolled: bool) -> None:
    if rolled:
        mlir.register_lowering(threefry2x32.threefry2x32_p,
                               threefry2x32._threefry2x32_cpu_lowering_rule, platform="cpu")
    else:
        threefry.unroll_threefry_on_cpu()


def main(argv: list[str]) -> None:
    del argv
    key, rows = jax.random.key(0), []
    for shape in _SHAPES:
        x = jnp.ones(shape)
        row, masks = {"shape": "x".join(map(str, shape))}, []
        for name, rolled in (("jax", True), ("package", False)):
            _lowered_with(rolled)  # fresh functions: each is lowered once, with the rule set now
            mask = jax.jit(lambda k, shape=shape: jax.random.bernoulli(k, 0.9, shape))
            dropout = jax.jit(lambda k, x: jnp.where(jax.random.bernoulli(k, 0.9, x.shape),
                                                     x / 0.9, 0.0))
            row[f"{name}_mask_ms"] = 1e3 * median_seconds(
                lambda mask=mask: mask(key), _REPEATS.value)[0]
            row[f"{name}_dropout_ms"] = 1e3 * median_seconds(
                lambda dropout=dropout, x=x: dropout(key, x), _REPEATS.value)[0]
            masks.append(np.asarray(mask(key)))
        _lowered_with(rolled=False)
        if not np.array_equal(*masks):
            raise SystemExit(f"the two lowerings drew different bits at {shape}")
        row["mask_speedup"] = row["jax_mask_ms"] / row["package_mask_ms"]
        rows.append(row)
    report(rows, [("shape", "shape", "s"), ("jax_mask_ms", "jax mask ms", ".2f"),
                  ("package_mask_ms", "package mask ms", ".2f"),
                  ("mask_speedup", "speed-up", ".1f"), ("jax_dropout_ms", "jax dropout ms", ".2f"),
                  ("package_dropout_ms", "package dropout ms", ".2f")],
           notes=[f"bernoulli(0.9) masks; draws of >= {threefry.UNROLL_FROM} numbers unrolled; "
                  "bits equal"])


if __name__ == "__main__":
    app.run(main)
