"""Sampling wall-clock per width, side by side in one run, next to the MACs ratio.

    python benchmarks/sampling_widths.py --config=configs/digits.py [--batch=64] [--steps=20]

Prints a table and one JSON line per width. Each width is compiled and warmed up first, then
timed over `--repeats` runs (median), so the figures are steady-state sampling only.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddsm_jax.diffusion.schedules import diffusion_from_config  # noqa: E402
from ddsm_jax.models.cost import macs_table  # noqa: E402
from ddsm_jax.models.network import init_network  # noqa: E402
from ddsm_jax.sampling import ScheduleSampler, initial_noise  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per sampling call.")
_STEPS = flags.DEFINE_integer("steps", 20, "DDIM steps.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per width.")


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    config.sampling.method, config.sampling.num_steps = "ddim", _STEPS.value
    network, params = init_network(config, jax.random.key(0))
    sampler = ScheduleSampler(network, diffusion_from_config(config.diffusion), config.sampling)
    noise = initial_noise(jax.random.key(1), _BATCH.value, network.image_shape)
    costs = macs_table(network, params)
    rows = []
    for index, width in enumerate(network.widths):
        schedule = sampler.uniform(index)
        sampler(params, schedule, noise, jax.random.key(2)).block_until_ready()  # compile, warm up
        times = []
        for _ in range(_REPEATS.value):
            start = time.perf_counter()
            sampler(params, schedule, noise, jax.random.key(2)).block_until_ready()
            times.append(time.perf_counter() - start)
        rows.append({"width": width, "seconds": statistics.median(times),
                     "images_per_sec": _BATCH.value / statistics.median(times),
                     "macs_total": costs[width]["total"]})
    full = rows[0]
    print(f"{' '.join(sys.argv)}\n{'width':>6} {'s/batch':>8} {'img/s':>8} {'time ratio':>10} {'MACs ratio':>10}")
    for row in rows:
        row["time_ratio"] = row["seconds"] / full["seconds"]
        row["macs_ratio"] = row["macs_total"] / full["macs_total"]
        print(f"{row['width']:>6} {row['seconds']:>8.3f} {row['images_per_sec']:>8.1f} "
              f"{row['time_ratio']:>10.3f} {row['macs_ratio']:>10.3f}")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
