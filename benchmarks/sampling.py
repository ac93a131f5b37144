"""Sampling wall clock per width and per schedule, side by side in one run, next to MACs.

    python -m benchmarks.sampling --config=configs/digits.py --batch=100 --steps=20 \\
        --schedule=DIR/search/schedule.json

Each row is compiled and warmed up first, then timed over `--repeats` runs (median): steady-state
sampling only. `--schedule` adds a step-aware row: a searched `schedule.json` (made for DDIM
with `--steps` steps) or the release's per-timestep file, read at the DDIM timesteps.
`time/MACs` is the wall-clock ratio over the MACs ratio (1 = time falls exactly as MACs do);
issue 6's goal is <= 1.25 for the schedule. `saving` is the time saved over the MACs saved.
The sampler splits each batch over the local devices (`--devices` of them; 0: all); on a CPU, with
`XLA_FLAGS=--xla_force_host_platform_device_count=2`, a half batch per core ran the digits
network's narrow widths 1.2-1.5x faster (full width 1.1x) than one program threading each
kernel over both cores (docs/performance.md); `--devices=1` times the one-device program.
"""

from __future__ import annotations

import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks.common import median_seconds, report
from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.cost import macs_table
from ddsm_jax.models.network import init_network
from ddsm_jax.sampling import ScheduleSampler, batch_mesh, initial_noise, replicate
from ddsm_jax.width_schedule import load_schedule

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per sampling call.")
_STEPS = flags.DEFINE_integer("steps", 20, "DDIM steps.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per width.")
_SCHEDULE = flags.DEFINE_string("schedule", None, "A schedule file to time beside the widths.")
_DEVICES = flags.DEFINE_integer("devices", 0, "Local devices to split each batch over (0: all; "
                                "on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=CORES).")


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    config.sampling.method, config.sampling.num_steps = "ddim", _STEPS.value
    network, params = init_network(config, jax.random.key(0))
    devices = _devices(_DEVICES.value, _BATCH.value)
    sampler = ScheduleSampler(network, diffusion_from_config(config.diffusion), config.sampling,
                              devices=devices)
    noise = initial_noise(jax.random.key(1), _BATCH.value, network.image_shape)
    params = replicate(params, batch_mesh(devices, _BATCH.value))  # once, not per run
    costs = macs_table(network, params)
    per_width = [costs[w]["total"] for w in network.widths]
    schedules = {f"{w:g}": sampler.uniform(i) for i, w in enumerate(network.widths)}
    if _SCHEDULE.value:
        loaded = load_schedule(_SCHEDULE.value, widths=network.widths, sampler="ddim",
                               timesteps=sampler.timesteps)
        schedules["schedule"] = sampler.to_indices(loaded)
    rows = []
    for name, schedule in schedules.items():
        def run(schedule=schedule):
            return sampler(params, schedule, noise, jax.random.key(2))

        seconds, compiles = median_seconds(run, _REPEATS.value)
        rows.append({"width": name, "seconds": seconds, "images_per_sec": _BATCH.value / seconds,
                     "devices": len(devices),
                     "macs_mean": sum(per_width[i] for i in schedule) / len(schedule),
                     "compile_seconds": compiles.seconds})
    full = rows[0]
    for row in rows:
        row["time_ratio"] = row["seconds"] / full["seconds"]
        row["macs_ratio"] = row["macs_mean"] / full["macs_mean"]
        row["time_over_macs"] = row["time_ratio"] / row["macs_ratio"]
        row["saving_ratio"] = ((1 - row["time_ratio"]) / (1 - row["macs_ratio"])
                               if row["macs_ratio"] < 1 else None)
    report(rows, [("width", "width", "s"), ("seconds", "s/batch", ".3f"),
                  ("images_per_sec", "img/s", ".1f"), ("time_ratio", "time ratio", ".3f"),
                  ("macs_ratio", "MACs ratio", ".3f"), ("time_over_macs", "time/MACs", ".2f"),
                  ("saving_ratio", "saving", ".2f"), ("compile_seconds", "compile s", ".1f")],
           notes=[f"config {config.data.name}, DDIM {_STEPS.value} steps, batch {_BATCH.value}"
                  f" split over {len(devices)} device(s)"])


def _devices(count: int, batch: int) -> list[jax.Device]:
    """The first `count` local devices (0: all), checked to split `batch` evenly."""
    local = jax.local_devices()
    count = count or len(local)
    if count > len(local):
        raise app.UsageError(f"--devices={count}: this process has {len(local)} local devices (on "
                             f"a CPU: XLA_FLAGS=--xla_force_host_platform_device_count={count})")
    if batch % count:
        raise app.UsageError(f"--batch={batch} does not split evenly over {count} devices; give a "
                             f"multiple or set --devices")
    return local[:count]


if __name__ == "__main__":
    app.run(main)
