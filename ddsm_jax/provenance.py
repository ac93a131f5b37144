"""Which weights an artifact was made from: the search state, schedule.json, pareto.json,
eval/metrics.json and an export each record the `weights_id` of the weights they came from, so
that a result made for older weights is never shown or exported with newer ones."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

from ddsm_jax.common_types import Params


class StaleResultError(ValueError):
    """A result made from other weights than the workdir's latest checkpoint."""


def weights_id(step: int, params: Params) -> dict[str, Any]:
    """{"step", "sha256"}: the training step and a hash of every parameter's bytes (in a fixed
    order), so equal steps of different runs still differ."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                             key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.asarray(jax.device_get(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(str(array.dtype).encode() + str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return {"step": int(step), "sha256": digest.hexdigest()[:16]}


def describe_weights(weights: dict[str, Any] | None) -> str:
    if not weights:
        return "weights of unknown provenance"
    return f"the weights of step {weights['step']} ({weights['sha256']})"


def check_made_from(path: Any, recorded: dict[str, Any] | None, current: dict[str, Any],
                    remedy: str) -> None:
    """Raises `StaleResultError` when the file at `path` records weights other than `current`.
    Files that record none (written by hand, or converted from elsewhere) pass."""
    if recorded and recorded != current:
        raise StaleResultError(f"{path} was made for {describe_weights(recorded)}, but the "
                               f"workdir now holds {describe_weights(current)}: {remedy}")
