"""Connects the slimmable network to the step-aware samplers.

A schedule is one index into `network.widths` per sampling step, in sampling order. Only the
branches a schedule uses (a width, and for the multi-stage network the stage of the step's
timestep) become `lax.switch` branches, so the network is traced (and compiled) once per distinct
branch, whatever the number of steps.

A batch is split over as many of the sampler's devices (by default this process's) as divide its
size, the parameters replicated on them: the images do not interact, so the samples are those of
one device (to float rounding), and no device computes another's images (parameters committed to
a training mesh would otherwise make every device of it sample the whole batch).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from ddsm_jax.common_types import Params
from ddsm_jax.diffusion import samplers
from ddsm_jax.diffusion.schedules import Diffusion
from ddsm_jax.models.network import Network
from ddsm_jax.width_schedule import WidthSchedule


class ScheduleSampler:
    """Samples with any width schedule; one compiled program per set of widths used."""

    def __init__(self, network: Network, diffusion: Diffusion, sampling: ml_collections.ConfigDict,
                 timesteps: Sequence[int] | None = None,
                 devices: Sequence[jax.Device] | None = None):
        """`timesteps`: the DDIM sampler's own (a searched schedule's) instead of the config's
        grid. `devices`: those a batch is split over (default: this process's)."""
        self.network = network
        self.diffusion = diffusion
        self.sampling = sampling
        self.method = sampling.method
        if timesteps is None:
            self.timesteps = samplers.sampling_timesteps(
                sampling.method, diffusion.num_timesteps, sampling.num_steps, sampling.spacing)
        elif sampling.method != "ddim":
            raise ValueError(f"only the DDIM sampler visits chosen timesteps; the config samples "
                             f"with {sampling.method}")
        else:
            self.timesteps = np.asarray(timesteps, np.int64)
        self.eta = sampling.eta
        self.variance = sampling.variance
        self.clip_denoised = sampling.clip_denoised
        # The multi-stage network runs the decoder of each step's stage (all 0 for DDSM's).
        self.stages = network.stages_of(self.timesteps)
        self.devices = tuple(jax.local_devices() if devices is None else devices)
        self._jitted = jax.jit(self._sample, static_argnames="branches")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def _sample(self, params: Params, branch_schedule: jax.Array, x_T: jax.Array, key: jax.Array,
                branches: tuple[tuple[tuple[str, Any], ...], ...]) -> jax.Array:
        eps_fns = [functools.partial(self.network.apply, params, **dict(b)) for b in branches]
        return samplers.sample(eps_fns, self.diffusion, branch_schedule, x_T, key,
                               method=self.method, timesteps=self.timesteps, eta=self.eta,
                               variance=self.variance, clip_denoised=self.clip_denoised)

    def step_update(self) -> samplers.StepUpdate:
        """This sampler's update of the images at one step, for loops of its own (AdaDiff's)."""
        return samplers.step_update(self.diffusion, method=self.method, timesteps=self.timesteps,
                                    eta=self.eta, variance=self.variance,
                                    clip_denoised=self.clip_denoised)

    def branch_ids(self, schedule: np.ndarray) -> np.ndarray:
        """Each step's branch in `network.branch_fns` order: its stage's block, its width."""
        return self.stages * len(self.network.widths) + np.asarray(schedule, np.int32)

    def __call__(self, params: Params, schedule: Sequence[int], x_T: jax.Array,
                 key: jax.Array) -> jax.Array:
        schedule = np.asarray(schedule, dtype=np.int32)
        if schedule.shape != (self.num_steps,):
            raise ValueError(f"the schedule has {schedule.size} entries but the {self.method} sampler "
                             f"runs {self.num_steps} steps")
        if schedule.min() < 0 or schedule.max() >= len(self.network.widths):
            raise ValueError(f"schedule indices must lie in [0, {len(self.network.widths)}) "
                             f"(widths {self.network.widths})")
        ids = self.branch_ids(schedule)
        used = np.unique(ids)
        branches = tuple(self.network.branch(*divmod(int(i), len(self.network.widths)))
                         for i in used)
        branch_schedule = jnp.asarray(np.searchsorted(used, ids), jnp.int32)
        params, x_T, key = split_batch(self.devices, params, x_T, key)
        return self._jitted(params, branch_schedule, x_T, key, branches=branches)

    def uniform(self, width_index: int) -> np.ndarray:
        return np.full((self.num_steps,), width_index, np.int32)

    def for_schedule(self, width_schedule: WidthSchedule) -> ScheduleSampler:
        """The sampler that runs `width_schedule`: this one, or where the search also chose the
        timesteps, one on the schedule's own."""
        return self.with_timesteps(width_schedule.timesteps if width_schedule.timesteps_searched
                                   else None)

    def with_timesteps(self, timesteps: Sequence[int] | None) -> ScheduleSampler:
        """This sampler on other timesteps (None or the same: this one)."""
        if timesteps is None or list(timesteps) == list(self.timesteps):
            return self
        return ScheduleSampler(self.network, self.diffusion, self.sampling, timesteps=timesteps,
                               devices=self.devices)

    def to_indices(self, width_schedule: WidthSchedule) -> np.ndarray:
        """A schedule file's widths as this network's indices, checked against this sampler."""
        return width_schedule.indices_for(self.network.widths, self.method, self.timesteps)

    def to_width_schedule(self, schedule: Sequence[int], timesteps: Sequence[int] | None = None,
                          **figures) -> WidthSchedule:
        """`timesteps`: where the search chose them (else this sampler's)."""
        if timesteps is not None:
            figures = {**figures, "timesteps_searched": True}
        return WidthSchedule(self.network.widths, tuple(int(i) for i in schedule),
                             tuple(int(t) for t in (self.timesteps if timesteps is None
                                                    else timesteps)), self.method, figures)


def batch_mesh(devices: Sequence[jax.Device], batch_size: int) -> Mesh:
    """The first k of `devices`, k the most of them that divide `batch_size`, as axis "batch".

    Why a divisor rather than padding: a batch's per-step noise is drawn for its whole shape, so
    its size must not depend on the machine for the same seed to give the same samples."""
    count = max(k for k in range(1, len(devices) + 1) if batch_size % k == 0)
    return Mesh(np.asarray(devices[:count]), ("batch",))


def replicate(params: Params, mesh: Mesh) -> Params:
    """`params` on every device of `mesh` (no copy where they already are). Parameters a pod's
    training left replicated over every process's devices are taken from this process's copy."""
    return jax.device_put(jax.tree_util.tree_map(_local_copy, params), NamedSharding(mesh, P()))


def _local_copy(x: Any) -> Any:
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x
    if not x.is_fully_replicated:
        raise ValueError("the parameters are split over several processes' devices (config.mesh."
                         "fsdp across hosts); gather them before sampling on one process, e.g. "
                         "with jax.experimental.multihost_utils.process_allgather")
    return x.addressable_data(0)


def split_batch(devices: Sequence[jax.Device], params: Params, x_T: jax.Array,
                key: jax.Array) -> tuple[Params, jax.Array, jax.Array]:
    """A sampler's inputs placed for `batch_mesh`: the images split, the rest replicated."""
    mesh = batch_mesh(devices, x_T.shape[0])
    return (replicate(params, mesh), jax.device_put(x_T, NamedSharding(mesh, P("batch"))),
            replicate(key, mesh))


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
    """Samples `noise.shape[0]` images batch by batch (equal batch shapes: one compilation);
    where the sampler also returns per-image values (AdaDiff's exits), those too. The progress
    bar starts after the first batch, so that its rate leaves compilation out. The parameters
    are replicated over the batch's devices once, not per batch."""
    params = replicate(params, batch_mesh(sampler.devices, batch_size))

    def batch(start: int) -> np.ndarray:
        chunk = noise[start:start + batch_size]
        count = chunk.shape[0]
        if count < batch_size:  # pad the last batch rather than compile a new shape
            chunk = jnp.concatenate([chunk, jnp.zeros((batch_size - count, *chunk.shape[1:]))])
        out = sampler(params, schedule, chunk, jax.random.fold_in(key, start))
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[:count], out)

    starts = range(0, noise.shape[0], batch_size)
    outputs = [batch(starts[0])]
    with tqdm(total=len(starts), initial=1, desc="sampling", unit="batch", disable=not progress,
              leave=False) as bar:
        for start in starts[1:]:
            outputs.append(batch(start))
            bar.update(1)
    return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *outputs)
