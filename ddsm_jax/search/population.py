"""Samples of a whole population of width schedules in one compiled program.

Common random numbers: every candidate starts from the same x_T and draws the same noise at
each step, so candidates differ only through their schedules. Two consequences:

* candidates are spread over a `pop` device axis with `shard_map`; each device runs its own
  candidates with a scalar `lax.switch`, so only the scheduled width executes;
* candidates whose schedules agree on the first k steps have identical trajectories for k steps.
  The population is sorted, so such candidates sit next to each other, and at each step only
  the first of a run of equal prefixes (its *representative*) calls the network; the others copy
  its result. That is the same arithmetic on the same inputs, so the samples are bitwise those
  of evaluating every candidate from scratch.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddsm_jax.diffusion import samplers
from ddsm_jax.models.network import Params
from ddsm_jax.sampling import ScheduleSampler


@dataclasses.dataclass(frozen=True)
class EvaluationPlan:
    """Which candidate computes which step, for a population laid out over `num_shards` devices.

    `order` sorts the population (padded to a multiple of the shards with copies of the last
    candidate); `schedules[k]` is the k-th sorted candidate; `representative[k, i]` is the index,
    local to k's shard, of the candidate whose step-i result k uses (k itself when it computes).
    """

    order: np.ndarray
    schedules: np.ndarray
    representative: np.ndarray
    num_candidates: int
    num_shards: int

    @property
    def network_evaluations(self) -> int:
        """Network calls (each on the N shared-noise samples) the plan makes, padding excluded."""
        per_shard = self.representative.shape[0] // self.num_shards
        local = np.arange(self.representative.shape[0]) % per_shard
        computes = self.representative == local[:, None]
        return int(computes[:self.num_candidates].sum())


def plan_evaluation(population: np.ndarray, num_shards: int = 1, *,
                    share_prefixes: bool = True) -> EvaluationPlan:
    """Sorts the population and marks the shared prefixes inside each device's block."""
    population = np.asarray(population, np.int32)
    chex.assert_rank(population, 2)
    count, num_steps = population.shape
    order = np.lexsort(population.T[::-1])
    padded = -(-count // num_shards) * num_shards
    order = np.concatenate([order, np.full(padded - count, order[-1])])
    schedules = population[order]
    per_shard = padded // num_shards
    representative = np.tile(np.arange(per_shard, dtype=np.int32)[:, None], (num_shards, num_steps))
    if share_prefixes:
        for shard in range(num_shards):
            block = schedules[shard * per_shard:(shard + 1) * per_shard]
            # same[k, i]: candidate k agrees with k - 1 on steps 0..i.
            same = np.cumprod(block[1:] == block[:-1], axis=1).astype(bool)
            rows = representative[shard * per_shard:(shard + 1) * per_shard]
            for k in range(1, per_shard):
                rows[k] = np.where(same[k - 1], rows[k - 1], k)
    return EvaluationPlan(order, schedules, representative, count, num_shards)


def naive_evaluations(population: np.ndarray) -> int:
    return int(np.asarray(population).size)


class PopulationSampler:
    """Final samples of every candidate, `(P, N, H, W, C)`, from shared noise."""

    def __init__(self, sampler: ScheduleSampler, mesh: Mesh | None = None):
        self.sampler = sampler
        self.mesh = mesh if mesh is not None else Mesh(np.asarray(jax.local_devices()), ("pop",))
        self.num_shards = self.mesh.shape["pop"]
        self.update = samplers.step_update(
            sampler.diffusion, method=sampler.method, timesteps=sampler.timesteps,
            eta=sampler.eta, variance=sampler.variance, clip_denoised=sampler.clip_denoised)
        replicated, split = P(), P("pop")
        self._run = jax.jit(jax.shard_map(
            self._local, mesh=self.mesh, in_specs=(replicated, split, split, replicated, replicated),
            out_specs=split, check_vma=False))

    def _local(self, params: Params, schedules: jax.Array, representative: jax.Array,
               x_T: jax.Array, key: jax.Array) -> jax.Array:
        """One device's block: steps outside, candidates inside, each one `switch` or a copy."""
        network = self.sampler.network
        eps_fns = [functools.partial(_eps, network, params, width=w) for w in network.widths]
        num_local = schedules.shape[0]
        t_of = jnp.asarray(self.sampler.timesteps, jnp.int32)
        states = jnp.broadcast_to(x_T, (num_local, *x_T.shape))

        def step_body(states, inputs):
            step, widths, reps = inputs
            t_batch = jnp.full((x_T.shape[0],), t_of[step], jnp.int32)

            def candidate_body(new_states, k):
                def compute(x, _):
                    eps = jax.lax.switch(widths[k], eps_fns, x, t_batch).astype(x.dtype)
                    return self.update(x, eps, step, key)

                x_k = jax.lax.cond(reps[k] == k, compute, lambda _, copied: copied,
                                   states[k], new_states[reps[k]])
                return new_states.at[k].set(x_k), None

            new_states, _ = jax.lax.scan(candidate_body, states, jnp.arange(num_local))
            return new_states, None

        steps = jnp.arange(schedules.shape[1], dtype=jnp.int32)
        final, _ = jax.lax.scan(step_body, states, (steps, schedules.T, representative.T))
        return jnp.clip(final, -1.0, 1.0)

    def place(self, per_candidate: np.ndarray) -> jax.Array:
        """Per-candidate rows onto the `pop` devices, split as the compiled program expects."""
        return jax.device_put(per_candidate, NamedSharding(self.mesh, P("pop")))

    def __call__(self, params: Params, population: np.ndarray, x_T: jax.Array, key: jax.Array,
                 *, share_prefixes: bool = True) -> tuple[np.ndarray, EvaluationPlan]:
        """Samples in the population's own order, and the plan (with its network-call count)."""
        population = np.asarray(population, np.int32)
        chex.assert_shape(population, (None, self.sampler.num_steps))
        chex.assert_rank(x_T, 4)
        plan = plan_evaluation(population, self.num_shards, share_prefixes=share_prefixes)
        samples = self._run(params, self.place(plan.schedules), self.place(plan.representative),
                            x_T, key)
        samples = np.asarray(samples)[:plan.num_candidates]
        unsorted = np.empty_like(samples)
        unsorted[plan.order[:plan.num_candidates]] = samples
        return unsorted, plan


def _eps(network, params: Params, x: jax.Array, t: jax.Array, *, width: float) -> jax.Array:
    return network.apply(params, x, t, width=width)

