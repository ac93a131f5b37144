"""Connects the slimmable network to the step-aware samplers.

A schedule is one index into `network.widths` per sampling step, in sampling order. Only the
widths a schedule uses become `lax.switch` branches, so the network is traced (and compiled)
once per distinct width, whatever the number of steps.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from ddsm_jax.common_types import Params
from ddsm_jax.diffusion import samplers
from ddsm_jax.diffusion.schedules import Diffusion
from ddsm_jax.models.network import Network
from ddsm_jax.width_schedule import WidthSchedule


class ScheduleSampler:
    """Samples with any width schedule; one compiled program per set of widths used."""

    def __init__(self, network: Network, diffusion: Diffusion, sampling: ml_collections.ConfigDict):
        self.network = network
        self.diffusion = diffusion
        self.method = sampling.method
        self.timesteps = samplers.sampling_timesteps(
            sampling.method, diffusion.num_timesteps, sampling.num_steps, sampling.spacing)
        self.eta = sampling.eta
        self.variance = sampling.variance
        self.clip_denoised = sampling.clip_denoised
        self._jitted = jax.jit(self._sample, static_argnames="branch_widths")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def _sample(self, params: Params, branch_schedule: jax.Array, x_T: jax.Array, key: jax.Array,
                branch_widths: tuple[float, ...]) -> jax.Array:
        eps_fns = [functools.partial(self._eps, params, width=w) for w in branch_widths]
        return samplers.sample(eps_fns, self.diffusion, branch_schedule, x_T, key,
                               method=self.method, timesteps=self.timesteps, eta=self.eta,
                               variance=self.variance, clip_denoised=self.clip_denoised)

    def _eps(self, params: Params, x: jax.Array, t: jax.Array, *, width: float) -> jax.Array:
        return self.network.apply(params, x, t, width=width)

    def __call__(self, params: Params, schedule: Sequence[int], x_T: jax.Array,
                 key: jax.Array) -> jax.Array:
        schedule = np.asarray(schedule, dtype=np.int32)
        if schedule.shape != (self.num_steps,):
            raise ValueError(f"the schedule has {schedule.size} entries but the {self.method} sampler "
                             f"runs {self.num_steps} steps")
        if schedule.min() < 0 or schedule.max() >= len(self.network.widths):
            raise ValueError(f"schedule indices must lie in [0, {len(self.network.widths)}) "
                             f"(widths {self.network.widths})")
        used = np.unique(schedule)
        branch_widths = tuple(self.network.widths[i] for i in used)
        branch_schedule = jnp.asarray(np.searchsorted(used, schedule), jnp.int32)
        return self._jitted(params, branch_schedule, x_T, key, branch_widths=branch_widths)

    def uniform(self, width_index: int) -> np.ndarray:
        return np.full((self.num_steps,), width_index, np.int32)

    def to_indices(self, width_schedule: WidthSchedule) -> np.ndarray:
        """A schedule file's widths as this network's indices, checked against this sampler."""
        return width_schedule.indices_for(self.network.widths, self.method, self.timesteps)

    def to_width_schedule(self, schedule: Sequence[int], **figures) -> WidthSchedule:
        return WidthSchedule(self.network.widths, tuple(int(i) for i in schedule),
                             tuple(int(t) for t in self.timesteps), self.method, figures)


def initial_noise(key: jax.Array, num_samples: int, image_shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, (num_samples, *image_shape), jnp.float32)


def stream_draws(key: jax.Array, num_samples: int,
                 image_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(initial images, per-step noise key) of a sampling stream (`ddsm_jax.layout.Stream`):
    sub-streams 0 and 1 of `key`, so that every stage draws its samples the same way."""
    return (initial_noise(jax.random.fold_in(key, 0), num_samples, image_shape),
            jax.random.fold_in(key, 1))


def sample_in_batches(sampler: ScheduleSampler, params: Params, schedule: Sequence[int],
                      noise: jax.Array, key: jax.Array, batch_size: int, *,
                      progress: bool = False) -> np.ndarray:
    """Samples `noise.shape[0]` images batch by batch (equal batch shapes: one compilation).
    The progress bar starts after the first batch, so that its rate leaves compilation out."""

    def batch(start: int) -> np.ndarray:
        chunk = noise[start:start + batch_size]
        count = chunk.shape[0]
        if count < batch_size:  # pad the last batch rather than compile a new shape
            chunk = jnp.concatenate([chunk, jnp.zeros((batch_size - count, *chunk.shape[1:]))])
        return np.asarray(sampler(params, schedule, chunk, jax.random.fold_in(key, start)))[:count]

    starts = range(0, noise.shape[0], batch_size)
    outputs = [batch(starts[0])]
    with tqdm(total=len(starts), initial=1, desc="sampling", unit="batch", disable=not progress,
              leave=False) as bar:
        for start in starts[1:]:
            outputs.append(batch(start))
            bar.update(1)
    return np.concatenate(outputs)
