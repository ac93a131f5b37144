"""Device mesh and shardings, as data: the mesh shape comes from `config.mesh`.

Axes: `data` (batch parallel, parameters replicated) and `fsdp` (batch parallel too, and each
large parameter and optimizer moment split along one dimension). The batch is split over both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
# Parameters smaller than this stay replicated under FSDP: splitting them costs more than it saves.
FSDP_MIN_SIZE = 2**14


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh; `data=-1` takes every device that `fsdp` leaves."""
    devices = list(jax.devices() if devices is None else devices)
    fsdp = int(mesh_cfg.fsdp)
    data = len(devices) // fsdp if int(mesh_cfg.data) == -1 else int(mesh_cfg.data)
    if fsdp < 1 or data < 1 or data * fsdp != len(devices):
        raise ValueError(f"config.mesh data={mesh_cfg.data} x fsdp={mesh_cfg.fsdp} does not fit the "
                         f"{len(devices)} devices; use data=-1 or sizes whose product is {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Split the largest dimension that `fsdp` divides; replicate small or indivisible arrays."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
    """A sharding for every leaf of a train state (parameters, EMA, optimizer moments, step)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, _fsdp_spec(tuple(x.shape), fsdp)),
                                  abstract_state)


def global_batch(local_batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows of the batch -> one global array (every process calls it)."""
    return jax.make_array_from_process_local_data(sharding, local_batch)
