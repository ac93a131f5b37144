"""A width per U-Net stage: the finer search space of `model.stage_widths`.

A branch of the slimmable U-Net is a width `w` (every layer at w, the paper's space) or a triple
`(encoder, middle, decoder)`: the time MLP, input convolution and down path at the first width,
the two middle blocks at the second, the up path at the third. Slimmable layers take their
input channels from the incoming tensor, so any triple runs on the same weights; the decoder's
concatenations then meet channel counts the equal-width sandwich never trained, which is why
the triples are trained as sandwich branches too (`training.sandwich`).

Only neighbouring widths are mixed (each stage at one of two adjacent entries of
`model.widths`): with four widths that is 18 triples beside the 4 global widths, each its own
compiled program in the samplers' switch, rather than 4^3 = 64.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

Width = float | tuple[float, float, float]
STAGE_NAMES = ("encoder", "middle", "decoder")


def as_width(value: Any) -> Width:
    """A width from a config or a JSON file: a number, or three (a triple of equal numbers is
    that number, so `(0.5, 0.5, 0.5)` and `0.5` are one branch)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 3:
            raise ValueError(f"a width per stage is (encoder, middle, decoder), got {value!r}")
        triple = tuple(float(v) for v in value)
        return triple[0] if len(set(triple)) == 1 else triple
    return float(value)


def is_global(width: Width) -> bool:
    """One width for every stage (a number), not an (encoder, middle, decoder) triple."""
    return not isinstance(width, tuple)


def stage_profile(width: Width) -> tuple[float, float, float]:
    """(encoder, middle, decoder) widths of a branch."""
    return (width, width, width) if is_global(width) else tuple(width)


def width_label(width: Width) -> str:
    """`0.5` for a global width, `0.5/1.0/0.5` (encoder/middle/decoder) for a triple."""
    return str(width) if is_global(width) else "/".join(str(w) for w in width)


def width_json(width: Width) -> float | list[float]:
    return width if is_global(width) else list(width)


def neighbour_triples(widths: Sequence[float]) -> tuple[Width, ...]:
    """The global widths and every triple of two adjacent widths (in `widths`' order), widest
    first: ordered by the sum of the stages' positions in `widths`, then the decoder's, the
    middle's and the encoder's: index 0 stays the full width, the last the narrowest, and cost
    falls roughly with the index, as the search's mutation (a neighbouring index) and budget
    repair (the next index) assume."""
    values = [float(w) for w in widths]
    rank = {w: i for i, w in enumerate(values)}
    triples = {tuple(values[i] for i in ranks)
               for low in range(max(1, len(values) - 1))
               for ranks in itertools.product(range(low, min(low + 2, len(values))), repeat=3)}
    ordered = sorted(triples, key=lambda t: (sum(rank[w] for w in t), rank[t[2]], rank[t[1]],
                                             rank[t[0]]))
    return tuple(as_width(t) for t in ordered)


def global_indices(widths: Sequence[Width]) -> list[int]:
    """Indices of the global widths (every stage equal): the uniform baselines of a search."""
    return [i for i, w in enumerate(widths) if is_global(w)]
