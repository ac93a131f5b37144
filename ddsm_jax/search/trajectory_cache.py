"""Kept trajectory states of the search's population, so children skip their parents' prefixes.

Every candidate of a search samples from the same noise, so the state after step i depends only
on the schedule's first i + 1 widths. Children are crossovers and mutations of the population:
they begin with long runs of a parent's widths. Keeping the population's states after a few
steps lets a child start at the longest kept prefix it shares with any of them; the arithmetic
from there on is the same, so its samples are bitwise those of running it from x_T.
"""

from __future__ import annotations

import math

import numpy as np


def keep_steps_for_budget(num_steps: int, population_size: int, state_bytes: int,
                          budget_mb: float) -> tuple[int, ...]:
    """Evenly spread steps whose states fit the budget twice over (population and children
    are both held while the next population is chosen). Never the last step: a schedule
    identical to a scored one is never scored again."""
    per_step = 2 * population_size * state_bytes
    count = min(num_steps - 1, int(budget_mb * 2**20 // per_step)) if per_step else 0
    if count <= 0:
        return ()
    return tuple(int(i) for i in np.unique(np.round(np.linspace(0, num_steps - 2, count))))


class TrajectoryCache:
    """The states after `keep_steps` of each schedule of the current population."""

    def __init__(self, keep_steps: tuple[int, ...]):
        self.keep_steps = tuple(keep_steps)
        self._states: dict[bytes, np.ndarray] = {}  # schedule -> (len(keep_steps), N, H, W, C)
        self._parents: dict[bytes, tuple[np.ndarray, int]] = {}  # looked up: (parent's, start)

    def __len__(self) -> int:
        return len(self._states)

    def lookup(self, population: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(starts, start_states): how many steps each candidate can skip, and its state then."""
        population = np.asarray(population, np.int64)
        prefixes: dict[bytes, tuple[np.ndarray, int]] = {}
        for key, states in self._states.items():
            row = np.frombuffer(key, np.int64)
            for slot, step in enumerate(self.keep_steps):
                prefixes.setdefault(row[:step + 1].tobytes(), (states, slot))
        starts = np.zeros(len(population), np.int64)
        found: dict[int, np.ndarray] = {}
        self._parents = {}
        for k, row in enumerate(population):
            for step in reversed(self.keep_steps):
                hit = prefixes.get(row[:step + 1].tobytes())
                if hit is not None:
                    starts[k], found[k] = step + 1, hit[0][hit[1]]
                    self._parents[row.tobytes()] = (hit[0], step + 1)
                    break
        if not found:
            return starts, None
        template = next(iter(found.values()))
        start_states = np.zeros((len(population), *template.shape), template.dtype)
        for k, state in found.items():
            start_states[k] = state
        return starts, start_states

    def add(self, population: np.ndarray, kept: np.ndarray) -> None:
        """Keeps the states a population sampler returned for the last looked-up population.
        A candidate that started part-way never ran its earlier kept steps: those states are its
        parent's (the same prefix), so they are taken from there."""
        steps = np.asarray(self.keep_steps)
        for row, states in zip(np.asarray(population, np.int64), kept):
            key = row.tobytes()
            if key in self._parents:
                parent, start = self._parents[key]
                before = steps + 1 < start
                states = states.copy()
                states[before] = parent[before]
            self._states[key] = states
        self._parents = {}

    def retain(self, population: np.ndarray) -> None:
        """Drops every schedule but `population`'s: only they can be parents from now on."""
        wanted = {row.tobytes() for row in np.asarray(population, np.int64)}
        self._states = {k: v for k, v in self._states.items() if k in wanted}


def state_bytes(num_samples: int, image_shape: tuple[int, ...]) -> int:
    return 4 * num_samples * math.prod(image_shape)  # float32
