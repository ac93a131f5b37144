"""Compilations per stage, their seconds, and recompilations after warm-up (which must be 0).

    python -m benchmarks.compile --config=configs/digits.py

Compiles what each stage of `--mode=all` compiles, on fresh parameters: the train step once
per sandwich combination, the sampler once per set of widths a schedule uses, the search's
population sampler once per population shape. Then it runs each again with new data (other
batches, schedules, populations) and counts compilations: any is a recompilation bug. The
persistent compilation cache is not enabled here, so the seconds are real compile times.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app
from ml_collections import config_flags

from benchmarks.common import report
from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.network import init_network
from ddsm_jax.sampling import ScheduleSampler, initial_noise
from ddsm_jax.search.population import PopulationSampler
from ddsm_jax.search.trajectory_cache import keep_steps_for_budget, state_bytes
from ddsm_jax.training.sandwich import sandwich_widths
from ddsm_jax.training.train_step import TrainState, make_optimizer, make_train_step
from ddsm_jax.utils.compile_counter import CompileCounter

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Config file.")


def _measure(stage: str, what: str, first, again) -> dict:
    """Compilations of `first()` (cold) and of `again()` (warm: must be none)."""
    with CompileCounter() as cold:
        jax.block_until_ready(first())
    with CompileCounter() as warm:
        jax.block_until_ready(again())
    return {"stage": stage, "what": what, "compiles": cold.count, "seconds": cold.seconds,
            "recompiles": warm.count}


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    network, params = init_network(config, jax.random.key(0))
    diffusion = diffusion_from_config(config.diffusion)
    rows = []

    step = make_train_step(network, diffusion, config.training)
    state = TrainState.create(jax.tree_util.tree_map(jax.numpy.copy, params),
                              make_optimizer(config.training))
    shape = (config.training.batch_size, *network.image_shape)
    rng = jax.random.key(1)
    for widths in sorted({sandwich_widths(network.widths, config.seed, i) for i in range(64)}):
        def train(seed: int, widths=widths):
            nonlocal state
            batch = jax.random.normal(jax.random.key(seed), shape)
            state, metrics = step(state, batch, rng, widths)
            return metrics["loss"]

        rows.append(_measure("train", "sandwich " + "/".join(f"{w:g}" for w in widths),
                             lambda: train(0), lambda: train(1)))

    sampler = ScheduleSampler(network, diffusion, config.sampling)
    noise = initial_noise(jax.random.key(2), config.sampling.batch_size, network.image_shape)
    last = len(network.widths) - 1
    mixed = np.where(np.arange(sampler.num_steps) < sampler.num_steps // 2, last, 0)
    for name, schedule, other in [("uniform full", sampler.uniform(0), sampler.uniform(0)),
                                  ("two widths", mixed, mixed[::-1].copy())]:
        rows.append(_measure("sample", name,
                             lambda s=schedule: sampler(params, s, noise, jax.random.key(3)),
                             lambda s=other: sampler(params, s, noise, jax.random.key(4))))

    search = config.search
    search_noise = initial_noise(jax.random.key(5), search.num_samples, network.image_shape)
    keep = keep_steps_for_budget(sampler.num_steps, search.population_size,
                                 state_bytes(search.num_samples, network.image_shape),
                                 search.trajectory_cache_mb)
    population_sampler = PopulationSampler(sampler, keep_steps=keep)
    rng_np = np.random.default_rng(0)

    def population():
        return rng_np.integers(0, len(network.widths),
                               (search.population_size, sampler.num_steps)).astype(np.int32)

    rows.append(_measure(
        "search", f"population {search.population_size}",
        lambda: population_sampler(params, population(), search_noise, rng).samples,
        lambda: population_sampler(params, population(), search_noise, rng).samples))
    report(rows, [("stage", "stage", "s"), ("what", "what", "s"), ("compiles", "compiles", "d"),
                  ("seconds", "seconds", ".1f"), ("recompiles", "recompiles", "d")],
           notes=[f"config {config.data.name}; recompiles = compilations after warm-up"])
    if any(row["recompiles"] for row in rows):
        raise SystemExit("recompilation after warm-up")


if __name__ == "__main__":
    app.run(main)
