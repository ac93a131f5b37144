"""Analytic cost of the slimmable U-Net per width, and of a per-step width schedule."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddsm_jax.common_types import Params
from ddsm_jax.models import macs
from ddsm_jax.models.network import Network


def width_macs(network: Network, params: Params, width: float, **branch) -> macs.MacCounter:
    """MACs of one image through the width-`width` sub-network (shapes only, nothing runs);
    `branch`: the network's other static choices (the multi-decoder U-Net's `stage`)."""
    x = jax.ShapeDtypeStruct((1, *network.image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    with macs.count_macs() as counter:
        jax.eval_shape(lambda p, x, t: network.apply(p, x, t, width=width, **branch), params, x, t)
    return counter


def macs_table(network: Network, params: Params,
               widths: Sequence[float] | None = None) -> dict[float, dict[str, int]]:
    """{width: {"conv_linear": int, "total": int}} for the network's widths."""
    table = {}
    for width in widths if widths is not None else network.widths:
        counter = width_macs(network, params, width)
        table[width] = {"conv_linear": counter.conv_linear, "total": counter.total}
    return table


def schedule_cost(per_width_macs: Sequence[int], schedule: Sequence[int]) -> dict[str, float]:
    """Cost of sampling with `schedule` (width indices per step) against full width everywhere.

    `per_width_macs[i]` is the per-image cost of width index i; index 0 is the full network.
    """
    schedule = np.asarray(schedule, dtype=np.int64)
    if schedule.ndim != 1 or schedule.size == 0:
        raise ValueError(f"a schedule is a non-empty 1-D list of width indices, got shape {schedule.shape}")
    if schedule.min() < 0 or schedule.max() >= len(per_width_macs):
        raise ValueError(f"schedule indices must lie in [0, {len(per_width_macs)}), "
                         f"got {schedule.min()}..{schedule.max()}")
    per_step = np.asarray(per_width_macs, dtype=np.float64)[schedule]
    full = float(per_width_macs[0]) * schedule.size
    return {"macs_mean": float(per_step.mean()), "macs_total": float(per_step.sum()),
            "macs_ratio": float(per_step.sum() / full)}
