"""Width schedules as genomes: seeding, crossover on runs of steps, mutations that move.

A genome is one width index per sampling step (index 0 = full width). Neighbouring steps of a
good schedule tend to share a width, so the operators act on runs: crossover swaps whole
stretches between cut points, and block mutation repaints a stretch. All randomness comes from
the numpy Generator passed in, so a search is a function of its seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

Repair = Callable[[np.ndarray], np.ndarray]  # makes a genome admissible (e.g. within budget)


def no_repair(genome: np.ndarray) -> np.ndarray:
    """Every genome is admissible (objectives without a hard constraint)."""
    return genome


@dataclasses.dataclass(frozen=True)
class Operators:
    num_widths: int
    num_steps: int
    crossover_rate: float = 0.9
    max_cut_points: int = 3
    gene_mutation_rate: float | None = None  # per step; default 2 / num_steps
    block_mutation_rate: float = 0.4  # chance that a child gets one repainted stretch
    shift_mutation_rate: float = 0.3  # chance that one run boundary moves
    uniform: tuple[int, ...] | None = None  # the widths seeded uniformly; default all

    @property
    def uniform_widths(self) -> tuple[int, ...]:
        """The baselines' widths: all, or with a width per U-Net stage the global ones."""
        return tuple(range(self.num_widths)) if self.uniform is None else self.uniform

    @property
    def per_gene(self) -> float:
        if self.gene_mutation_rate is not None:
            return self.gene_mutation_rate
        return min(1.0, 2.0 / self.num_steps)


def uniform_schedules(widths: Sequence[int], num_steps: int) -> np.ndarray:
    """One schedule per width index in `widths`, that width at every step."""
    return np.repeat(np.asarray(widths, np.int32)[:, None], num_steps, axis=1)


def piecewise_schedule(rng: np.random.Generator, num_widths: int, num_steps: int,
                       max_pieces: int = 4, *, narrowing: bool) -> np.ndarray:
    """A staircase of a few runs of constant width, the shape searched schedules usually take.
    `narrowing=True` goes from wide to narrow along the sampling order, False the other way:
    which end of the trajectory tolerates narrow networks is the data's call, so seed both.
    """
    pieces = int(rng.integers(2, max_pieces + 1))
    cuts = np.sort(rng.choice(np.arange(1, num_steps), size=min(pieces - 1, num_steps - 1),
                              replace=False))
    widths = np.sort(rng.integers(0, num_widths, size=len(cuts) + 1))
    if not narrowing:
        widths = widths[::-1]
    return np.repeat(widths, np.diff(np.concatenate([[0], cuts, [num_steps]]))).astype(np.int32)


def fit_budget(rng: np.random.Generator, genome: np.ndarray, width_cost: np.ndarray,
               budget: float) -> np.ndarray:
    """Narrows random steps one width at a time until the mean cost is within `budget`: children
    of parents near the budget straddle it, and an infeasible child is a wasted evaluation.
    `width_cost`: each width's cost, or a (steps, widths) table of it."""
    child = genome.astype(np.int32).copy()
    if np.ndim(width_cost) == 1:
        width_cost = np.broadcast_to(width_cost, (child.size, len(width_cost)))
    steps = np.arange(child.size)
    narrowest = width_cost.shape[1] - 1
    while width_cost[steps, child].mean() > budget:
        wider = np.flatnonzero(child < narrowest)
        if wider.size == 0:
            break
        child[rng.choice(wider)] += 1
    return child


def initial_population(rng: np.random.Generator, size: int, num_widths: int, num_steps: int,
                       num_piecewise: int, repair: Repair = no_repair,
                       uniform_widths: Sequence[int] | None = None) -> np.ndarray:
    """The uniform schedules of `uniform_widths` (default: every width; the baselines to beat,
    never repaired), staircases narrowing and widening in turn, then random schedules."""
    uniform = uniform_schedules(range(num_widths) if uniform_widths is None else uniform_widths,
                                num_steps)[:size]
    rows = []
    while len(rows) < min(size - len(uniform), num_piecewise):
        rows.append(repair(piecewise_schedule(rng, num_widths, num_steps,
                                              narrowing=len(rows) % 2 == 0)))
    while len(rows) < size - len(uniform):
        rows.append(repair(rng.integers(0, num_widths, size=num_steps).astype(np.int32)))
    if not rows:
        return uniform
    seen = {row.tobytes() for row in uniform}
    return np.concatenate([uniform, unique_rows(np.stack(rows), rng, num_widths, seen=seen,
                                                repair=repair)])


def crossover(rng: np.random.Generator, ops: Operators, a: np.ndarray,
              b: np.ndarray) -> np.ndarray:
    """Multi-point crossover: alternate parents between 1..max_cut_points random cuts."""
    if rng.random() >= ops.crossover_rate or ops.num_steps < 2:
        return a.copy()
    num_cuts = int(rng.integers(1, min(ops.max_cut_points, ops.num_steps - 1) + 1))
    cuts = np.sort(rng.choice(np.arange(1, ops.num_steps), size=num_cuts, replace=False))
    take_b = np.cumsum(np.isin(np.arange(ops.num_steps), cuts)) % 2 == 1
    return np.where(take_b, b, a).astype(np.int32)


def mutate(rng: np.random.Generator, ops: Operators, genome: np.ndarray) -> np.ndarray:
    """Per-step changes to a neighbouring width, a repainted stretch, or a moved run boundary."""
    child = genome.copy()
    flips = rng.random(ops.num_steps) < ops.per_gene
    if flips.any():
        child[flips] = np.clip(child[flips] + rng.choice([-1, 1], size=flips.sum()), 0,
                               ops.num_widths - 1)
    if rng.random() < ops.block_mutation_rate:
        length = int(rng.integers(1, max(2, ops.num_steps // 4) + 1))
        start = int(rng.integers(0, ops.num_steps - length + 1))
        child[start:start + length] = rng.integers(0, ops.num_widths)
    if rng.random() < ops.shift_mutation_rate:
        boundaries = np.flatnonzero(np.diff(child)) + 1
        if boundaries.size:
            edge = int(rng.choice(boundaries))
            shift = int(rng.integers(1, max(2, ops.num_steps // 10) + 1)) * int(rng.choice([-1, 1]))
            lo, hi = sorted((edge, int(np.clip(edge + shift, 0, ops.num_steps))))
            child[lo:hi] = child[edge - 1] if shift > 0 else child[edge]
    return child.astype(np.int32)


def unique_rows(population: np.ndarray, rng: np.random.Generator, num_widths: int,
                seen: set[bytes] | None = None, repair: Repair = no_repair,
                space: GenomeSpace | None = None) -> np.ndarray:
    """Replaces duplicates (within the population or of `seen`) by mutated (and repaired)
    copies; `space`: where genomes hold more than widths, how to mutate and draw them."""
    seen = set() if seen is None else set(seen)
    rows = []
    space = space or GenomeSpace(Operators(num_widths, population.shape[1]))
    for row in population:
        candidate, attempts = row.astype(np.int32), 0
        while candidate.tobytes() in seen and attempts < 100:
            candidate, attempts = repair(space.mutate(rng, candidate)), attempts + 1
            if attempts > 10:  # tiny search spaces: fall back to a random genome
                candidate = repair(space.random(rng))
        seen.add(candidate.tobytes())
        rows.append(candidate)
    return np.stack(rows)


# -- timesteps and widths together ------------------------------------------------------------
# A genome of `search.timesteps=searched` is the widths of the K steps, then the K timesteps
# they run at (descending). A step's gene is the pair: crossover cuts both halves at the same
# steps, so a child inherits whole (width, timestep) steps.


def descending_timesteps(timesteps: np.ndarray, num_timesteps: int) -> np.ndarray:
    """The nearest strictly descending sequence of distinct timesteps in [0, num_timesteps)."""
    ts = np.sort(np.asarray(timesteps, np.int64))[::-1].copy()
    count = ts.size
    ts = np.clip(ts, count - 1 - np.arange(count), num_timesteps - 1 - np.arange(count))
    for i in range(1, count):
        ts[i] = min(ts[i], ts[i - 1] - 1)
    return ts.astype(np.int32)


def spaced_timesteps(rng: np.random.Generator, num_steps: int, num_timesteps: int,
                     first_at_least: int) -> np.ndarray:
    """A random grid t_i = t_0 ((K-1-i)/(K-1))^p: p = 1 spaces the steps evenly, p > 1 puts
    more of them near the data (DDIM's quadratic spacing is p = 2), p < 1 near the noise."""
    first = int(rng.integers(first_at_least, num_timesteps))
    power = float(rng.uniform(0.6, 2.5))
    fractions = (np.arange(num_steps - 1, -1, -1) / max(num_steps - 1, 1)) ** power
    return descending_timesteps(np.round(first * fractions), num_timesteps)


@dataclasses.dataclass(frozen=True)
class GenomeSpace:
    """The search's genomes and their operators: widths alone (`grid` None, the functions
    above), or where the search chooses the timesteps too, the joint genome."""

    ops: Operators
    grid: np.ndarray | None = None  # the sampler's timesteps: the uniform schedules' (baselines)
    num_timesteps: int = 0
    timestep_rate: float | None = None  # chance that a step's timestep moves; default per_gene
    warp_rate: float = 0.2  # chance that the whole grid's spacing is bent

    @property
    def searches_timesteps(self) -> bool:
        return self.grid is not None

    def split(self, genome: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return genome[:self.ops.num_steps], genome[self.ops.num_steps:]

    def join(self, widths: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        return np.concatenate([widths, timesteps]).astype(np.int32)

    def random_timesteps(self, rng: np.random.Generator) -> np.ndarray:
        return spaced_timesteps(rng, self.ops.num_steps, self.num_timesteps, int(self.grid[0]))

    def random(self, rng: np.random.Generator) -> np.ndarray:
        widths = rng.integers(0, self.ops.num_widths, size=self.ops.num_steps).astype(np.int32)
        if not self.searches_timesteps:
            return widths
        return self.join(widths, self.random_timesteps(rng))

    def crossover(self, rng: np.random.Generator, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if not self.searches_timesteps:
            return crossover(rng, self.ops, a, b)
        steps = self.ops.num_steps
        child = crossover(rng, self.ops, a.reshape(2, steps), b.reshape(2, steps)).reshape(-1)
        widths, timesteps = self.split(child)
        return self.join(widths, descending_timesteps(timesteps, self.num_timesteps))

    def mutate(self, rng: np.random.Generator, genome: np.ndarray) -> np.ndarray:
        """The widths' mutations, then each timestep moved within its neighbours, and now and
        then the spacing of the whole grid bent (t -> t_0 (t / t_0)^q)."""
        if not self.searches_timesteps:
            return mutate(rng, self.ops, genome)
        widths, timesteps = self.split(genome)
        widths = mutate(rng, self.ops, widths)
        ts = timesteps.astype(np.int64).copy()
        rate = self.ops.per_gene if self.timestep_rate is None else self.timestep_rate
        for i in np.flatnonzero(rng.random(ts.size) < rate):
            above = self.num_timesteps if i == 0 else ts[i - 1]
            below = -1 if i == ts.size - 1 else ts[i + 1]
            if above - below > 2:
                ts[i] = rng.integers(below + 1, above)
        if rng.random() < self.warp_rate and ts[0] > 0:
            bent = ts[0] * (ts / ts[0]) ** rng.uniform(0.75, 1.33)
            ts = np.round(bent).astype(np.int64)
        return self.join(widths, descending_timesteps(ts, self.num_timesteps))

    def initial_population(self, rng: np.random.Generator, size: int, num_piecewise: int,
                           repair: Repair = no_repair) -> np.ndarray:
        """Every uniform width on the sampler's grid (the baselines), then staircases and random
        widths on random grids."""
        num_widths, num_steps = self.ops.num_widths, self.ops.num_steps
        if not self.searches_timesteps:
            return initial_population(rng, size, num_widths, num_steps, num_piecewise, repair,
                                      self.ops.uniform_widths)
        uniform = [self.join(w, self.grid)
                   for w in uniform_schedules(self.ops.uniform_widths, num_steps)]
        rows = []
        while len(rows) < min(size - len(uniform), num_piecewise):
            widths = piecewise_schedule(rng, num_widths, num_steps,
                                        narrowing=len(rows) % 2 == 0)
            rows.append(repair(self.join(widths, self.random_timesteps(rng))))
        while len(rows) < size - len(uniform):
            rows.append(repair(self.random(rng)))
        uniform = np.stack(uniform)[:size]
        if not rows:
            return uniform
        seen = {row.tobytes() for row in uniform}
        return np.concatenate([uniform, unique_rows(np.stack(rows), rng, num_widths, seen=seen,
                                                    repair=repair, space=self)])
