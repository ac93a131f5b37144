"""Sampling wall-clock per width and per schedule, side by side in one run, next to MACs.

    python benchmarks/sampling_widths.py --config=configs/digits.py [--batch=64] [--steps=20]
        [--schedule=DIR/search/schedule.json]

Prints a table and one JSON line per row. Each row is compiled and warmed up first, then timed
over `--repeats` runs (median), so the figures are steady-state sampling only. `--schedule`
adds a step-aware row: a searched `schedule.json` (made for DDIM with `--steps` steps) or the
release's per-timestep file, read at the DDIM timesteps. The goal (issue 5): the schedule's time
saving is at least 0.8 of its MACs saving.
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
from ddsm_jax.width_schedule import load_schedule  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per sampling call.")
_STEPS = flags.DEFINE_integer("steps", 20, "DDIM steps.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per width.")
_SCHEDULE = flags.DEFINE_string("schedule", None, "A schedule file to time beside the widths.")


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    config.sampling.method, config.sampling.num_steps = "ddim", _STEPS.value
    network, params = init_network(config, jax.random.key(0))
    sampler = ScheduleSampler(network, diffusion_from_config(config.diffusion), config.sampling)
    noise = initial_noise(jax.random.key(1), _BATCH.value, network.image_shape)
    costs = macs_table(network, params)
    per_width = [costs[w]["total"] for w in network.widths]
    schedules = {str(w): sampler.uniform(i) for i, w in enumerate(network.widths)}
    if _SCHEDULE.value:
        loaded = load_schedule(_SCHEDULE.value, widths=network.widths, sampler="ddim",
                               timesteps=sampler.timesteps)
        schedules["schedule"] = sampler.to_indices(loaded)
    rows = []
    for name, schedule in schedules.items():
        sampler(params, schedule, noise, jax.random.key(2)).block_until_ready()  # compile, warm up
        times = []
        for _ in range(_REPEATS.value):
            start = time.perf_counter()
            sampler(params, schedule, noise, jax.random.key(2)).block_until_ready()
            times.append(time.perf_counter() - start)
        rows.append({"width": name, "seconds": statistics.median(times),
                     "images_per_sec": _BATCH.value / statistics.median(times),
                     "macs_mean": sum(per_width[i] for i in schedule) / len(schedule)})
    full = rows[0]
    print(f"{' '.join(sys.argv)}\n{'width':>8} {'s/batch':>8} {'img/s':>8} {'time ratio':>10} "
          f"{'MACs ratio':>10} {'saving ratio':>12}")
    for row in rows:
        row["time_ratio"] = row["seconds"] / full["seconds"]
        row["macs_ratio"] = row["macs_mean"] / full["macs_mean"]
        # Fraction of the MACs saving that shows up as time saving (1 = all of it).
        row["saving_ratio"] = ((1 - row["time_ratio"]) / (1 - row["macs_ratio"])
                               if row["macs_ratio"] < 1 else None)
        saving = "" if row["saving_ratio"] is None else f"{row['saving_ratio']:.2f}"
        print(f"{row['width']:>8} {row['seconds']:>8.3f} {row['images_per_sec']:>8.1f} "
              f"{row['time_ratio']:>10.3f} {row['macs_ratio']:>10.3f} {saving:>12}")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
