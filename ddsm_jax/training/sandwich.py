"""The sandwich rule: which widths a supernet training step trains."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ddsm_jax.models.stage_widths import Width, is_global


def widest_first(widths: Sequence[Width]) -> list[Width]:
    """Distinct widths, widest first: sorted numbers; a network with a width per stage is
    already in that order (`models.stage_widths.neighbour_triples`), its triples the middles."""
    if not all(map(is_global, widths)):
        return list(dict.fromkeys(widths))
    return sorted({float(w) for w in widths}, reverse=True)


def sandwich_widths(widths: Sequence[Width], seed: int, step: int,
                    global_share: float = 0.0) -> tuple[Width, ...]:
    """(largest, smallest, one random middle width) for this step.

    Drawn on the host from an RNG keyed by (seed, step): every host and every resumed run agrees
    without communication, and the result is a static argument, so there is one compiled train
    step per middle width. `global_share`: see `sandwich_of`.
    """
    return sandwich_of(widths, np.random.default_rng([seed, step]), global_share)


def sandwich_of(widths: Sequence[Width], rng: np.random.Generator,
                global_share: float = 0.0) -> tuple[Width, ...]:
    """(largest, smallest, a middle width drawn from `rng`); all of them where there are at most
    two (no draw then). With a width per stage, `global_share` > 0 is the share of steps whose
    middle is a global width (the others: a triple); 0 draws among all middles alike."""
    ordered = widest_first(widths)
    if len(ordered) <= 2:
        return tuple(ordered)
    middle = ordered[1:-1]
    plain = [w for w in middle if is_global(w)]
    if global_share > 0 and plain and len(plain) < len(middle):
        middle = plain if rng.random() < global_share else [w for w in middle if not is_global(w)]
    return (ordered[0], ordered[-1], middle[int(rng.integers(len(middle)))])


def sandwiches_between(widths: Sequence[Width], seed: int, start: int, stop: int,
                       global_share: float = 0.0) -> list[tuple[Width, ...]]:
    """The distinct sandwiches that steps [start, stop) train, in order of first use: the
    programs a run compiles (looking no further than the steps it takes to meet them all)."""
    possible = max(1, len(widest_first(widths)) - 2)
    seen: dict[tuple[Width, ...], None] = {}
    for step in range(start, stop):
        seen.setdefault(sandwich_widths(widths, seed, step, global_share), None)
        if len(seen) == possible:
            break
    return list(seen)


def every_sandwich(widths: Sequence[Width]) -> list[tuple[Width, ...]]:
    """Every width tuple the sandwich rule can pass to the train step: one per middle width.

    Same order as `training.sandwich.sandwich_widths` (largest, smallest, middle), because the
    tuple is the step's static argument and so names its compiled program.
    """
    ordered = widest_first(widths)
    if len(ordered) <= 2:
        return [tuple(ordered)]
    return [(ordered[0], ordered[-1], middle) for middle in ordered[1:-1]]
