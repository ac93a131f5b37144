"""Stages that sit on top of training: drawing samples (later: search, evaluate, export)."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections

from ddsm_jax.sampling import ScheduleSampler, initial_noise, sample_in_batches
from ddsm_jax.training.train import TrainResult
from ddsm_jax.utils.images import save_grid


def sample_grids(config: ml_collections.ConfigDict, result: TrainResult, out_dir: Path) -> list[Path]:
    """One grid per width from the EMA weights, all from the same noise, so they compare."""
    sampling = config.sampling
    sampler = ScheduleSampler(result.network, result.diffusion, sampling)
    key = jax.random.fold_in(jax.random.key(config.seed), 2)
    noise = initial_noise(jax.random.fold_in(key, 0), sampling.num_samples, result.network.image_shape)
    paths = []
    for index, width in enumerate(result.network.widths):
        images = sample_in_batches(sampler, result.state.ema_params, sampler.uniform(index), noise,
                                   jax.random.fold_in(key, 1), sampling.batch_size)
        path = out_dir / f"width_{width}.png"
        save_grid(images, path)
        paths.append(path)
    return paths
