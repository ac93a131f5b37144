"""Samples of a whole population of width schedules in one compiled program.

Common random numbers: every candidate starts from the same x_T and draws the same noise at
each step, so candidates differ only through their schedules. Two consequences:

* candidates are spread over a `pop` device axis with `shard_map`; each device runs its own
  candidates with a scalar `lax.switch`, so only the scheduled width executes;
* candidates whose schedules agree on the first k steps have identical trajectories for k steps.
  The population is sorted, so such candidates sit next to each other, and at each step only
  the first of a run of equal prefixes (its *representative*) calls the network; the others copy
  its result. That is the same arithmetic on the same inputs, so the samples are bitwise those
  of evaluating every candidate from scratch;
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
from ddsm_jax.sampling import ScheduleSampler


@dataclasses.dataclass(frozen=True)
class EvaluationPlan:
    """Which candidate computes which step, for a population laid out over `num_shards` devices.

    `order` sorts the population (padded to a multiple of the shards with copies of the last
    candidate); `schedules[k]` is the k-th sorted candidate; `representative[k, i]` is the index,
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
    population = np.asarray(population, np.int32)
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
    """Samples of every candidate of a population from shared noise; see the module doc."""

    def __init__(self, sampler: ScheduleSampler, mesh: Mesh | None = None,
                 keep_steps: tuple[int, ...] = ()):
        self.sampler = sampler
        self.mesh = mesh if mesh is not None else Mesh(np.asarray(jax.local_devices()), ("pop",))
        self.num_shards = self.mesh.shape["pop"]
        if any(not 0 <= i < sampler.num_steps for i in keep_steps):
            raise ValueError(f"keep_steps {keep_steps} must lie in [0, {sampler.num_steps})")
        self.keep_steps = tuple(sorted(set(keep_steps)))
        self.update = sampler.step_update()
        replicated, split = P(), P("pop")
        self._run = jax.jit(jax.shard_map(
            self._local, mesh=self.mesh, in_specs=(replicated, split, split, split, replicated),
            out_specs=(split, split), check_vma=False))
        self._broadcast = jax.jit(lambda x, count: jnp.broadcast_to(x, (count, *x.shape)),
                                  static_argnums=1, out_shardings=NamedSharding(self.mesh, split))

    def _local(self, params: Params, schedules: jax.Array, representative: jax.Array,
               initial: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One device's block: steps outside, candidates inside, each one `switch`, a copy or
        (before its start) nothing."""
        network = self.sampler.network
        eps_fns = network.branch_fns(params)
        # Each step's first branch: its stage's block of widths (all 0 for one network).
        first_branch = jnp.asarray(self.sampler.branch_ids(np.zeros(schedules.shape[1])))
        num_local = schedules.shape[0]
        t_of = jnp.asarray(self.sampler.timesteps, jnp.int32)
        slot_of = np.full(schedules.shape[1], -1, np.int32)
        slot_of[list(self.keep_steps)] = np.arange(len(self.keep_steps), dtype=np.int32)
        slot_of = jnp.asarray(slot_of)
        kept = jnp.zeros((num_local, len(self.keep_steps), *initial.shape[1:]), initial.dtype)

        def step_body(carry, inputs):
            states, kept = carry
            step, widths, reps = inputs
            t_batch = jnp.full((initial.shape[1],), t_of[step], jnp.int32)

            def candidate_body(new_states, k):
                def compute(x, _):
                    eps = jax.lax.switch(first_branch[step] + widths[k], eps_fns, x,
                                         t_batch).astype(x.dtype)
                    return self.update(x, eps, step, key)

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

        steps = jnp.arange(schedules.shape[1], dtype=jnp.int32)
        (final, kept), _ = jax.lax.scan(step_body, (initial, kept),
                                        (steps, schedules.T, representative.T))
        return jnp.clip(final, -1.0, 1.0), kept

    def place(self, per_candidate: np.ndarray) -> jax.Array:
        """Per-candidate rows onto the `pop` devices, split as the compiled program expects."""
        return jax.device_put(per_candidate, NamedSharding(self.mesh, P("pop")))

    def __call__(self, params: Params, population: np.ndarray, x_T: jax.Array, key: jax.Array,
                 *, share_prefixes: bool = True, starts: np.ndarray | None = None,
                 start_states: np.ndarray | None = None) -> PopulationSamples:
        """Samples in the population's own order; candidate k with `starts[k] > 0` begins from
        `start_states[k]`, the state after its first `starts[k]` steps on this noise."""
        population = np.asarray(population, np.int32)
        chex.assert_shape(population, (None, self.sampler.num_steps))
        chex.assert_rank(x_T, 4)
        plan = plan_evaluation(population, self.num_shards, share_prefixes=share_prefixes,
                               starts=starts)
        count = plan.num_candidates
        if plan.starts.any():
            chex.assert_shape(start_states, (count, *x_T.shape))
            initial = np.where(plan.starts[:, None, None, None, None] > 0,
                               np.asarray(start_states)[plan.order], np.asarray(x_T)[None])
            initial = self.place(initial.astype(np.float32))
        else:
            initial = self._broadcast(x_T, len(plan.order))
        samples, kept = self._run(params, self.place(plan.schedules),
                                  self.place(plan.representative), initial, key)
        unsorted = np.empty((count, *x_T.shape), np.float32)
        unsorted[plan.order[:count]] = np.asarray(samples)[:count]
        kept_unsorted = None
        if self.keep_steps:
            kept_unsorted = np.empty((count, *kept.shape[1:]), np.float32)
            kept_unsorted[plan.order[:count]] = np.asarray(kept)[:count]
        return PopulationSamples(unsorted, plan, kept_unsorted)

