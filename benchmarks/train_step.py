"""Supernet train-step throughput per width and per sandwich, against this machine's matmul peak.

    python -m benchmarks.train_step --config=configs/cifar10.py --batches=8,32
    python -m benchmarks.train_step --config=configs/digits.py --batches=8,128
    python -m benchmarks.train_step --batches=32 --microbatch_sizes=0,8 --single_widths=false
    python -m benchmarks.train_step --batches=8,32 --cpu_schedulers=memory,concurrency

Each row is one compiled train step (forward, backward, Adam, EMA), warmed up and then timed
over `--repeats` steps (median). A single-width row trains that width alone; a sandwich row is
the real step: full, narrowest and one middle width in one program. GFLOP/s counts the cost
model's MACs x 2 (multiply-add) x 3 (forward + two backward products); `of peak` divides it by
the float32 matmul rate the script measures first. Issue 6's goal: >= 0.5 at CIFAR-10.
`--microbatch_sizes` and `--cpu_schedulers` time the same steps with each value of
`training.microbatch_size` and `training.cpu_scheduler` side by side; `--middle_widths=0.5`
times only the sandwich whose third width is 0.5.
"""

from __future__ import annotations

import itertools

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks.common import matmul_peak_gflops, median_seconds, report
from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.cost import macs_table
from ddsm_jax.models.network import init_network
from ddsm_jax.training.sandwich import sandwich_widths
from ddsm_jax.training.train_step import (
    CPU_SCHEDULERS,
    TrainState,
    make_optimizer,
    make_train_step,
)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar10.py", "Config file.")
_BATCHES = flags.DEFINE_list("batches", ["8", "32"], "Global batch sizes to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps per row.")
_SINGLE = flags.DEFINE_bool("single_widths", True, "Also time each width trained alone.")
_MIDDLES = flags.DEFINE_list("middle_widths", [],
                             "Time only the sandwiches with these middle widths (default: all).")
_MICROBATCHES = flags.DEFINE_list("microbatch_sizes", [],
                                  "training.microbatch_size values to compare (default: the "
                                  "config's; 0 is the whole batch).")
_SCHEDULERS = flags.DEFINE_list("cpu_schedulers", [],
                                "training.cpu_scheduler values to compare (default: the config's).")
# Checked as the flags are parsed: an unknown value would otherwise fail only after the rows of
# the values before it were measured.
flags.register_validator("cpu_schedulers", lambda values: set(values) <= set(CPU_SCHEDULERS),
                         f"--cpu_schedulers takes {','.join(CPU_SCHEDULERS)}")

TRAIN_FLOPS_PER_MAC = 2 * 3  # multiply-add; forward, input gradient, weight gradient


def _sandwiches(config: ml_collections.ConfigDict) -> list[tuple[float, ...]]:
    """The sandwiches training draws (one per middle width), narrowed to `--middle_widths`;
    checked before anything is measured, so a wrong width fails at once."""
    drawn = sorted({sandwich_widths(config.model.widths, config.seed, i) for i in range(64)})
    if not _MIDDLES.value:
        return drawn
    middles = {f"{s[-1]:g}" for s in drawn}
    if not set(_MIDDLES.value) <= middles:
        raise app.UsageError(f"--middle_widths={','.join(_MIDDLES.value)}: this config's "
                             f"sandwiches have middle widths {','.join(sorted(middles))}")
    return [s for s in drawn if f"{s[-1]:g}" in _MIDDLES.value]


def _time_steps(config: ml_collections.ConfigDict, sandwiches: list[tuple[float, ...]],
                rng: jax.Array, peak: float) -> list[dict]:
    """One row per batch size and width set, for the network `config` builds."""
    network, params = init_network(config, jax.random.key(0))
    macs = {w: row["total"] for w, row in macs_table(network, params).items()}
    step = make_train_step(network, diffusion_from_config(config.diffusion), config.training)
    state = TrainState.create(params, make_optimizer(config.training))
    combinations = ([(w,) for w in network.widths] if _SINGLE.value else []) + sandwiches
    rows = []
    for batch_size in map(int, _BATCHES.value):
        batch = jax.device_put(np.zeros((batch_size, *network.image_shape), np.float32))
        for widths in combinations:
            def run(widths=widths, batch=batch):
                nonlocal state
                state, metrics = step(state, batch, rng, widths)
                return metrics["loss"]

            seconds, compiles = median_seconds(run, _REPEATS.value)
            gflops = TRAIN_FLOPS_PER_MAC * sum(macs[w] for w in widths) * batch_size / seconds / 1e9
            rows.append({"config": config.data.name,
                         "microbatch": config.training.microbatch_size,
                         "scheduler": config.training.cpu_scheduler, "batch": batch_size,
                         "step": "sandwich" if len(widths) > 1 else "width",
                         "widths": "/".join(f"{w:g}" for w in widths), "seconds": seconds,
                         "images_per_sec": batch_size / seconds, "gflops": gflops,
                         "of_peak": gflops / peak, "compiles": compiles.count,
                         "compile_seconds": compiles.seconds})
    return rows


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    sandwiches = _sandwiches(config)
    rng = jax.random.key(1)
    peak = matmul_peak_gflops()
    rows = []
    for microbatch, scheduler in itertools.product(
            map(int, _MICROBATCHES.value or [config.training.microbatch_size]),
            _SCHEDULERS.value or [config.training.cpu_scheduler]):
        config.training.microbatch_size = microbatch
        config.training.cpu_scheduler = scheduler
        rows += _time_steps(config, sandwiches, rng, peak)
    report(rows, [("config", "config", "s"),
                  ("microbatch", "microbatch", "d"), ("scheduler", "scheduler", "s"),
                  ("batch", "batch", "d"),
                  ("step", "step", "s"), ("widths", "widths", "s"), ("seconds", "s/step", ".3f"),
                  ("images_per_sec", "img/s", ".1f"), ("gflops", "GFLOP/s", ".1f"),
                  ("of_peak", "of peak", ".2f"), ("compile_seconds", "compile s", ".1f")],
           notes=[f"float32 matmul peak measured now: {peak:.1f} GFLOP/s"])


if __name__ == "__main__":
    app.run(main)
