"""The sandwich rule: which widths a supernet training step trains."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sandwich_widths(widths: Sequence[float], seed: int, step: int) -> tuple[float, ...]:
    """(largest, smallest, one random middle width) for this step.

    Drawn on the host from an RNG keyed by (seed, step): every host and every resumed run agrees
    without communication, and the result is a static argument, so there is one compiled train
    step per middle width.
    """
    return sandwich_of(widths, np.random.default_rng([seed, step]))


def sandwich_of(widths: Sequence[float], rng: np.random.Generator) -> tuple[float, ...]:
    """(largest, smallest, a middle width drawn from `rng`); all of them where there are at most
    two (no draw then)."""
    ordered = sorted({float(w) for w in widths}, reverse=True)
    if len(ordered) <= 2:
        return tuple(ordered)
    middle = ordered[1:-1]
    return (ordered[0], ordered[-1], middle[int(rng.integers(len(middle)))])


def sandwiches_between(widths: Sequence[float], seed: int, start: int,
                       stop: int) -> list[tuple[float, ...]]:
    """The distinct sandwiches that steps [start, stop) train, in order of first use: the
    programs a run compiles (looking no further than the steps it takes to meet them all)."""
    possible = max(1, len({float(w) for w in widths}) - 2)
    seen: dict[tuple[float, ...], None] = {}
    for step in range(start, stop):
        seen.setdefault(sandwich_widths(widths, seed, step), None)
        if len(seen) == possible:
            break
    return list(seen)


def every_sandwich(widths: Sequence[float]) -> list[tuple[float, ...]]:
    """Every width tuple the sandwich rule can pass to the train step: one per middle width.

    Same order as `training.sandwich.sandwich_widths` (largest, smallest, middle), because the
    tuple is the step's static argument and so names its compiled program.
    """
    ordered = sorted({float(w) for w in widths}, reverse=True)
    if len(ordered) <= 2:
        return [tuple(ordered)]
    return [(ordered[0], ordered[-1], middle) for middle in ordered[1:-1]]
