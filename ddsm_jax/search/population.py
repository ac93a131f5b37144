"""Samples of a whole population of width schedules in one compiled program.

Common random numbers: every candidate starts from the same x_T and draws the same noise at
each step, so candidates differ only through their schedules. Two consequences:

* candidates are spread over a `pop` device axis with `shard_map`; each device runs its own
  candidates with a scalar `lax.switch`, so only the scheduled width executes;
* candidates whose schedules agree on the first k steps have identical trajectories for k steps
  (where each candidate has timesteps of its own: the same width, timestep and next timestep
  at each of those steps, `prefix_codes`). The population is sorted, so such candidates sit
  next to each other, and at each step only the first of a run of equal prefixes (its
  *representative*) calls the network; the others copy its result. That is the same
  arithmetic on the same inputs, so the samples are bitwise those of evaluating every
  candidate from scratch;
* a candidate can also start part-way: from a state kept (`keep_steps`) when an earlier
  generation ran a schedule with the same prefix. Children share long prefixes with their
  parents, so the search skips those steps too (`TrajectoryCache`).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddsm_jax.common_types import Params
from ddsm_jax.diffusion import samplers
from ddsm_jax.sampling import ScheduleSampler


@dataclasses.dataclass(frozen=True)
class EvaluationPlan:
    """Which candidate computes which step, for a population laid out over `num_shards` devices.

    `order` sorts the population (padded to a multiple of the shards with copies of the last
    candidate); `schedules[k]` is the k-th sorted candidate's row (its widths, or the
    `prefix_codes` of its steps); `representative[k, i]` is the index,
    local to k's shard, of the candidate whose step-i result k uses (k itself when it computes),
    or SKIP before `starts[k]`, the steps k's initial state has already been through.
    """

    order: np.ndarray
    schedules: np.ndarray
    representative: np.ndarray
    starts: np.ndarray
    num_candidates: int
    num_shards: int

    @property
    def network_evaluations(self) -> int:
        """Network calls (each on the N shared-noise samples) the plan makes, padding excluded."""
        per_shard = self.representative.shape[0] // self.num_shards
        local = np.arange(self.representative.shape[0]) % per_shard
        computes = self.representative == local[:, None]
        return int(computes[:self.num_candidates].sum())


SKIP = -1  # representative entry: the candidate's initial state is already past this step


def plan_evaluation(population: np.ndarray, num_shards: int = 1, *, share_prefixes: bool = True,
                    starts: np.ndarray | None = None) -> EvaluationPlan:
    """Sorts the population and marks the shared prefixes inside each device's block;
    `starts[k]` steps of candidate k are skipped (it starts from a kept state)."""
    population = np.asarray(population, np.int64)
    chex.assert_rank(population, 2)
    count, num_steps = population.shape
    starts = np.zeros(count, np.int32) if starts is None else np.asarray(starts, np.int32)
    chex.assert_shape(starts, (count,))
    order = np.lexsort(population.T[::-1])
    padded = -(-count // num_shards) * num_shards
    order = np.concatenate([order, np.full(padded - count, order[-1])])
    schedules, starts = population[order], starts[order]
    per_shard = padded // num_shards
    local = np.tile(np.arange(per_shard, dtype=np.int32)[:, None], (num_shards, num_steps))
    steps = np.arange(num_steps)
    representative = np.where(steps[None, :] < starts[:, None], SKIP, local).astype(np.int32)
    if share_prefixes:
        for shard in range(num_shards):
            first = shard * per_shard
            block = schedules[first:first + per_shard]
            # same[k, i]: candidate k agrees with k - 1 on steps 0..i.
            same = np.cumprod(block[1:] == block[:-1], axis=1).astype(bool)
            rows = representative[first:first + per_shard]
            for k in range(1, per_shard):
                # Copy k - 1's step-i result only where k - 1 really ran step i.
                copy = same[k - 1] & (steps >= starts[first + k - 1]) & (rows[k] != SKIP)
                rows[k] = np.where(copy, rows[k - 1], rows[k])
    return EvaluationPlan(order, schedules, representative, starts, count, num_shards)


def naive_evaluations(population: np.ndarray) -> int:
    return int(np.asarray(population).size)


@dataclasses.dataclass
class PopulationSamples:
    """Final samples `(P, N, H, W, C)` in the population's order, the plan that made them, and
    the states after each of `keep_steps`, `(P, len(keep_steps), N, H, W, C)` (or None)."""

    samples: np.ndarray
    plan: EvaluationPlan
    kept: np.ndarray | None


class PopulationSampler:
    """Samples of every candidate of a population from shared noise; see the module doc.

    A candidate is a width index per step, run on the sampler's timesteps or, where the search
    chooses them too, on its own (`timesteps`, one descending row per candidate)."""

    def __init__(self, sampler: ScheduleSampler, mesh: Mesh | None = None,
                 keep_steps: tuple[int, ...] = ()):
        self.sampler = sampler
        self.mesh = mesh if mesh is not None else Mesh(np.asarray(jax.local_devices()), ("pop",))
        self.num_shards = self.mesh.shape["pop"]
        if any(not 0 <= i < sampler.num_steps for i in keep_steps):
            raise ValueError(f"keep_steps {keep_steps} must lie in [0, {sampler.num_steps})")
        self.keep_steps = tuple(sorted(set(keep_steps)))
        sampling = sampler.sampling
        self.move = samplers.transition(sampler.diffusion, method=sampler.method,
                                        eta=sampling.eta, variance=sampling.variance,
                                        clip_denoised=sampling.clip_denoised)
        replicated, split = P(), P("pop")
        self._run = jax.jit(jax.shard_map(
            self._local, mesh=self.mesh, in_specs=(replicated, split, split, split, replicated),
            out_specs=(split, split), check_vma=False))
        self._broadcast = jax.jit(lambda x, count: jnp.broadcast_to(x, (count, *x.shape)),
                                  static_argnums=1, out_shardings=NamedSharding(self.mesh, split))

    def step_rows(self, population: np.ndarray,
                  timesteps: np.ndarray | None = None) -> np.ndarray:
        """(P, steps, 3): each candidate's branch (its step's stage block and width), timestep
        and destination timestep at every step: all a step's result depends on."""
        population = np.asarray(population, np.int32)
        chex.assert_shape(population, (None, self.sampler.num_steps))
        if timesteps is None:
            timesteps = np.broadcast_to(self.sampler.timesteps, population.shape)
        timesteps = np.asarray(timesteps, np.int32)
        chex.assert_equal_shape([population, timesteps])
        if timesteps.shape[0] and (np.any(np.diff(timesteps, axis=1) >= 0) or timesteps.min() < 0
                                   or timesteps.max() >= self.sampler.diffusion.num_timesteps):
            raise ValueError("each candidate's timesteps must descend within "
                             f"[0, {self.sampler.diffusion.num_timesteps})")
        stages = self.sampler.network.stages_of(timesteps.ravel()).reshape(timesteps.shape)
        branches = stages * len(self.sampler.network.widths) + population
        return np.stack([branches, timesteps, samplers.previous_timesteps(timesteps)], axis=-1)

    def prefix_codes(self, population: np.ndarray,
                     timesteps: np.ndarray | None = None) -> np.ndarray:
        """(P, steps) integers, equal on a candidate's first k steps exactly where two
        candidates' states after k steps are: what shared prefixes and kept states key on."""
        rows = self.step_rows(population, timesteps).astype(np.int64)
        num_t = self.sampler.diffusion.num_timesteps + 1
        return ((rows[..., 0] * num_t + rows[..., 1]) * num_t + rows[..., 2] + 1)

    def _local(self, params: Params, rows: jax.Array, representative: jax.Array,
               initial: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One device's block: steps outside, candidates inside, each one `switch`, a copy or
        (before its start) nothing."""
        eps_fns = self.sampler.network.branch_fns(params)
        num_local, num_steps = rows.shape[:2]
        slot_of = np.full(num_steps, -1, np.int32)
        slot_of[list(self.keep_steps)] = np.arange(len(self.keep_steps), dtype=np.int32)
        slot_of = jnp.asarray(slot_of)
        kept = jnp.zeros((num_local, len(self.keep_steps), *initial.shape[1:]), initial.dtype)

        def step_body(carry, inputs):
            states, kept = carry
            step, step_rows, reps = inputs

            def candidate_body(new_states, k):
                branch, t, t_prev = step_rows[k, 0], step_rows[k, 1], step_rows[k, 2]

                def compute(x, _):
                    t_batch = jnp.full((x.shape[0],), t, jnp.int32)
                    eps = jax.lax.switch(branch, eps_fns, x, t_batch).astype(x.dtype)
                    return self.move(x, eps, t, t_prev, step, key)

                # A skipped candidate "copies" its own, not yet updated, state.
                source = jnp.where(reps[k] == SKIP, k, reps[k])
                x_k = jax.lax.cond(reps[k] == k, compute, lambda _, copied: copied,
                                   states[k], new_states[source])
                return new_states.at[k].set(x_k), None

            new_states, _ = jax.lax.scan(candidate_body, states, jnp.arange(num_local))
            if self.keep_steps:
                slot = slot_of[step]
                kept = jax.lax.cond(slot >= 0, lambda k: k.at[:, slot].set(new_states),
                                    lambda k: k, kept)
            return (new_states, kept), None

        steps = jnp.arange(num_steps, dtype=jnp.int32)
        (final, kept), _ = jax.lax.scan(step_body, (initial, kept),
                                        (steps, jnp.swapaxes(rows, 0, 1), representative.T))
        return jnp.clip(final, -1.0, 1.0), kept

    def place(self, per_candidate: np.ndarray) -> jax.Array:
        """Per-candidate rows onto the `pop` devices, split as the compiled program expects."""
        return jax.device_put(per_candidate, NamedSharding(self.mesh, P("pop")))

    def __call__(self, params: Params, population: np.ndarray, x_T: jax.Array, key: jax.Array,
                 *, timesteps: np.ndarray | None = None, share_prefixes: bool = True,
                 starts: np.ndarray | None = None,
                 start_states: np.ndarray | None = None) -> PopulationSamples:
        """Samples in the population's own order; candidate k with `starts[k] > 0` begins from
        `start_states[k]`, the state after its first `starts[k]` steps on this noise."""
        chex.assert_rank(x_T, 4)
        rows = self.step_rows(population, timesteps)
        plan = plan_evaluation(self.prefix_codes(population, timesteps), self.num_shards,
                               share_prefixes=share_prefixes, starts=starts)
        count = plan.num_candidates
        if plan.starts.any():
            chex.assert_shape(start_states, (count, *x_T.shape))
            initial = np.where(plan.starts[:, None, None, None, None] > 0,
                               np.asarray(start_states)[plan.order], np.asarray(x_T)[None])
            initial = self.place(initial.astype(np.float32))
        else:
            initial = self._broadcast(x_T, len(plan.order))
        samples, kept = self._run(params, self.place(rows[plan.order].astype(np.int32)),
                                  self.place(plan.representative), initial, key)
        unsorted = np.empty((count, *x_T.shape), np.float32)
        unsorted[plan.order[:count]] = np.asarray(samples)[:count]
        kept_unsorted = None
        if self.keep_steps:
            kept_unsorted = np.empty((count, *kept.shape[1:]), np.float32)
            kept_unsorted[plan.order[:count]] = np.asarray(kept)[:count]
        return PopulationSamples(unsorted, plan, kept_unsorted)
