"""Per-branch seconds per sampling step, measured on this machine: the search's cost where
`search.cost = "seconds"` (OMS-DPM's measured-time budget instead of MACs).

MACs miss what the hardware makes of them (narrow convolutions run far below peak; attention and
normalisation cost time and few MACs), so a schedule priced in MACs can save less time than it
promises. Each branch's network call is compiled and timed at the sampling batch size (median of
`repeats` after a warm-up), and the sampler's own per-step work (the update, the noise, the
branch switch) is measured once and added to every branch. The table is cached in the workdir
with the device and batch it was measured on, and measured again when either changes.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddsm_jax.common_types import Params
from ddsm_jax.layout import Workdir
from ddsm_jax.models.cost import SchedulePrices
from ddsm_jax.sampling import ScheduleSampler
from ddsm_jax.utils.files import read_json, write_json
from ddsm_jax.utils.timing import median_seconds


def device_name() -> str:
    device = jax.devices()[0]
    return f"{device.platform}: {device.device_kind}"


def measure(sampler: ScheduleSampler, params: Params, batch_size: int,
            repeats: int) -> dict[str, Any]:
    """{"forward": (stages, widths) seconds of one network call on `batch_size` images,
    "step_overhead": the sampler's seconds per step beyond its network call}."""
    network = sampler.network
    x = jax.random.normal(jax.random.key(0), (batch_size, *network.image_shape), jnp.float32)
    t = jnp.full((batch_size,), sampler.timesteps[0], jnp.int32)
    forward = np.array([[median_seconds(
        jax.jit(functools.partial(network.apply, params, **dict(network.branch(stage, index)))),
        x, t, repeats=repeats) for index in range(len(network.widths))]
        for stage in range(network.num_stages)])
    full = sampler.uniform(0)
    whole = median_seconds(sampler, params, full, x, jax.random.key(1), repeats=repeats)
    calls = forward[sampler.stages, 0].sum()  # the network calls of that run
    return {"forward": forward.tolist(),
            "step_overhead": max(0.0, (whole - calls) / sampler.num_steps)}


def branch_seconds(workdir: Any, sampler: ScheduleSampler, params: Params, batch_size: int,
                   repeats: int) -> dict[str, Any]:
    """The cached measurement of `workdir` where it was made on this device at this batch size
    for this network's branches; else a new one, cached."""
    network = sampler.network
    wanted = {"device": device_name(), "batch_size": int(batch_size),
              "widths": list(network.widths), "stages": network.num_stages,
              "branch": network.branch_arg, "timesteps": [int(t) for t in sampler.timesteps]}
    path = Workdir(workdir).search / "branch_seconds.json"
    if path.is_file():
        cached = read_json(path)
        if all(cached.get(key) == value for key, value in wanted.items()):
            return cached
    print(f"timing every branch on {wanted['device']} at batch {batch_size}", flush=True)
    measured = {**wanted, "repeats": int(repeats), **measure(sampler, params, batch_size, repeats)}
    write_json(path, measured)
    return measured


def seconds_prices(measured: dict[str, Any], sampler: ScheduleSampler) -> SchedulePrices:
    """Each branch's seconds at each sampling step, priced against the network's own full
    compute at every step (what `ddsm_jax.sample --seconds_budget` and the export compare to)."""
    per_step = (np.asarray(measured["forward"], np.float64)[sampler.stages]
                + measured["step_overhead"])
    return SchedulePrices(per_step, float(per_step[:, 0].mean()))


def measured_ratio(sampler: ScheduleSampler, params: Params, schedule: np.ndarray,
                   batch_size: int, repeats: int) -> float:
    """The schedule's sampling time over full compute's, timed with the real sampler in
    alternating rounds (the check on the prediction)."""
    x = jax.random.normal(jax.random.key(0), (batch_size, *sampler.network.image_shape))
    key = jax.random.key(1)
    full = sampler.uniform(0)
    for run in (full, schedule):
        jax.block_until_ready(sampler(params, run, x, key))
    totals = {"full": [], "schedule": []}
    for _ in range(repeats):
        for name, run in (("full", full), ("schedule", schedule)):
            start = time.perf_counter()
            jax.block_until_ready(sampler(params, run, x, key))
            totals[name].append(time.perf_counter() - start)
    return statistics.median(totals["schedule"]) / statistics.median(totals["full"])
