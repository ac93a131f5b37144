"""MAC counting by tracing: each slimmable layer reports its work while the network is traced.

The count is analytic (formulas on static shapes) and has one source of truth, the network's own
forward pass, so the cost model can never drift from the model it describes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

# Categories that the paper counts (conv + linear) and the rest of the network's arithmetic.
CONV_LINEAR = ("conv", "linear")
OTHER = ("attention", "norm", "activation", "elementwise")

_active_counters: list[MacCounter] = []


@dataclasses.dataclass
class MacCounter:
    """Multiply-accumulates per category; elementwise work is counted as FLOPs / 2."""

    macs: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(CONV_LINEAR + OTHER, 0.0))
    # Conv MACs that only ever multiply zero padding: part of the paper's count, but skipped by
    # XLA's own cost analysis, which is what this is kept for.
    conv_padding: float = 0.0

    @property
    def conv_linear(self) -> int:
        return int(round(sum(self.macs[k] for k in CONV_LINEAR)))

    @property
    def total(self) -> int:
        return int(round(sum(self.macs.values())))


def record(category: str, macs: float) -> None:
    """Called by layers at trace time; a no-op unless a counter is active."""
    for counter in _active_counters:
        counter.macs[category] += macs


def record_conv_padding(macs: float) -> None:
    for counter in _active_counters:
        counter.conv_padding += macs


def record_elementwise(category: str, num_elements: int, flops_per_element: float) -> None:
    record(category, num_elements * flops_per_element / 2)


@contextlib.contextmanager
def count_macs() -> Iterator[MacCounter]:
    counter = MacCounter()
    _active_counters.append(counter)
    try:
        yield counter
    finally:
        _active_counters.remove(counter)
