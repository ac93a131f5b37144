"""Analytic cost of a network's branches (a width; for the multi-stage U-Net, a stage and a
width), and of a per-step width schedule."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddsm_jax.common_types import Params
from ddsm_jax.models import macs
from ddsm_jax.models.network import Network, abstract_network, strategy_name


def width_macs(network: Network, params: Params, width: float | None = None,
               **branch) -> macs.MacCounter:
    """MACs of one image through the width-`width` sub-network (shapes only, nothing runs);
    `branch`: the network's other static choices (the multi-decoder U-Net's `stage`, an early
    exit's `depth`)."""
    x = jax.ShapeDtypeStruct((1, *network.image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    if width is not None:
        branch["width"] = width
    with macs.count_macs() as counter:
        jax.eval_shape(lambda p, x, t: network.apply(p, x, t, **branch), params, x, t)
    return counter


def macs_table(network: Network, params: Params,
               widths: Sequence[float] | None = None) -> dict[Any, dict[str, int]]:
    """{width: {"conv_linear": int, "total": int}} for the network's widths; for the
    multi-stage network, {"stage S": ...} per stage (at its one width)."""
    table = {}
    if network.boundaries is not None:
        for stage in range(network.num_stages):
            counter = width_macs(network, params, **dict(network.branch(stage, 0)))
            table[f"stage {stage}"] = {"conv_linear": counter.conv_linear, "total": counter.total}
        return table
    for width in widths if widths is not None else network.widths:
        counter = width_macs(network, params, **{network.branch_arg: width})
        table[width] = {"conv_linear": counter.conv_linear, "total": counter.total}
    return table


def schedule_cost(per_width_macs: Sequence[int] | np.ndarray, schedule: Sequence[int], *,
                  reference: float | None = None) -> dict[str, float]:
    """Cost of sampling with `schedule` (width indices per step) against `reference` MACs at
    every step (default: width index 0, the full network).

    `per_width_macs[i]` is the per-image cost of width index i, the same at every step; or, as
    a (steps, widths) table, of width i at each step (the multi-stage network's stages differ).
    """
    schedule = np.asarray(schedule, dtype=np.int64)
    if schedule.ndim != 1 or schedule.size == 0:
        raise ValueError(f"a schedule is a non-empty 1-D list of width indices, got shape {schedule.shape}")
    table = np.asarray(per_width_macs, dtype=np.float64)
    if table.ndim == 1:
        table = np.broadcast_to(table, (schedule.size, table.size))
    if table.shape[0] != schedule.size:
        raise ValueError(f"a cost table of {table.shape[0]} steps for a schedule of {schedule.size}")
    if schedule.min() < 0 or schedule.max() >= table.shape[1]:
        raise ValueError(f"schedule indices must lie in [0, {table.shape[1]}), "
                         f"got {schedule.min()}..{schedule.max()}")
    per_step = table[np.arange(schedule.size), schedule]
    full = float(table[0, 0] if reference is None else reference) * schedule.size
    return {"macs_mean": float(per_step.mean()), "macs_total": float(per_step.sum()),
            "macs_ratio": float(per_step.sum() / full)}


def branch_macs(network: Network, params: Params) -> np.ndarray:
    """Per-image MACs (`total`) of every branch, as (stages, widths)."""
    return np.array([[width_macs(network, params, **dict(network.branch(stage, index))).total
                      for index in range(len(network.widths))]
                     for stage in range(network.num_stages)], np.float64)


def reference_macs(config: ml_collections.ConfigDict) -> float:
    """Per-image MACs of the full-width U-Net of `config.model`: the 1.0 of every strategy's MACs
    ratio, so that the ratios of different strategies compare."""
    single = ml_collections.ConfigDict(config.to_dict())
    single.strategy = "ddsm"
    network, params = abstract_network(single)
    return float(width_macs(network, params, 1.0).total)


@dataclasses.dataclass(frozen=True)
class SchedulePrices:
    """What each width costs at each sampling step, and the full U-Net's cost the ratios use."""

    per_step: np.ndarray  # (steps, widths), MACs per image
    reference: float

    @classmethod
    def of(cls, network: Network, params: Params, timesteps: Sequence[int],
           config: ml_collections.ConfigDict | None = None) -> SchedulePrices:
        """`config` is needed where the network is not DDSM's U-Net (whose first width is the
        reference): the others' ratios are against the full U-Net of `config.model`."""
        per_step = branch_macs(network, params)[network.stages_of(timesteps)]
        if network.boundaries is None and (config is None or strategy_name(config) == "ddsm"):
            return cls(per_step, float(per_step[0, 0]))
        if config is None:
            raise ValueError("a strategy's MACs ratio against the full U-Net needs its config")
        return cls(per_step, reference_macs(config))

    def __call__(self, schedule: Sequence[int]) -> dict[str, float]:
        return schedule_cost(self.per_step, schedule, reference=self.reference)

    @property
    def ratios(self) -> np.ndarray:
        """(steps, widths): each width's MACs at each step as a fraction of the reference."""
        return self.per_step / self.reference
