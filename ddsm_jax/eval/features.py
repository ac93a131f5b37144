"""Feature extraction in fixed-size batches under jit, split over the local devices.

Every feature network (the FID Inception, the domain classifier) is a `FeatureExtractor`: a pure
`apply_fn(params, images)` on float32 NHWC images in [-1, 1] (the diffusion model's own output
range), so samples go to the evaluator without a round trip through uint8.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """A feature network with its weights: `apply_fn(params, images) -> (N, dim)` float32."""

    name: str
    dim: int
    params: Any
    apply_fn: Callable[[Any, jax.Array], jax.Array]


def compute_features(extractor: FeatureExtractor, images: Any, *, batch_size: int = 200,
                     limit: int | None = None, progress: bool = False) -> np.ndarray:
    """Features of the first `limit` (default all) of `images` (N, H, W, C) in [-1, 1], as a
    float64 (N, dim) numpy array.

    `images` is anything sliceable into NHWC arrays (numpy, jax, the data layer's LazyImages),
    read one batch at a time, so reference sets larger than memory are fine. Every batch has
    the same shape (the last is padded), so the network compiles once; the batch is split over
    the local devices and the weights are replicated.
    """
    count_total = len(images) if limit is None else min(limit, len(images))
    devices = jax.local_devices()
    batch_size = -(-max(1, min(batch_size, count_total)) // len(devices)) * len(devices)
    mesh = Mesh(np.asarray(devices), ("batch",))
    batch_sharding = NamedSharding(mesh, P("batch"))
    params = jax.device_put(extractor.params, NamedSharding(mesh, P()))
    apply = jax.jit(extractor.apply_fn, out_shardings=NamedSharding(mesh, P()))
    chunks = []
    starts = range(0, count_total, batch_size)
    for start in tqdm(starts, desc=f"{extractor.name} features", disable=not progress,
                      leave=False):
        batch = np.asarray(images[start:min(start + batch_size, count_total)], np.float32)
        chex.assert_rank(batch, 4)
        count = len(batch)
        if count < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)])
        features = apply(params, jax.device_put(batch, batch_sharding))
        chex.assert_shape(features, (batch_size, extractor.dim))
        chunks.append(np.asarray(features[:count], dtype=np.float64))
    if not chunks:
        return np.zeros((0, extractor.dim))
    return np.concatenate(chunks)


def as_float_images(images: np.ndarray) -> np.ndarray:
    """uint8 images in [0, 255] (e.g. from `samples.npz`) to float32 in [-1, 1]."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return np.asarray(images, dtype=np.float32)

