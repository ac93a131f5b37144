"""Timestep groups and their widths for the Step-Adaptive Training strategy (Li et al., arXiv
2312.13307), whose paper gives neither its grouping nor its size rule in full. Our choices:

* groups are contiguous ranges of the sampler's timesteps, split where log-SNR changes most
  evenly: a dynamic program minimises the summed squared distance of each timestep's log-SNR to
  its group's centre, with every group holding between floor(n / 2K) and ceil(3n / 2K) steps (the
  size bounds of the multi-stage paper's SNR baseline, so no group is degenerate);
* a group's difficulty is a number per group (its mean loss under the base model, or minus its
  mean log-SNR); harder groups never get narrower widths than easier ones, and among the
  allocations that respect that order and a mean-MACs budget the one with the most MACs is
  taken (ties: the more even one). With four widths and K groups there are at most 4^K
  allocations, so every one is tried.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np


def log_snr(alphas_cumprod: np.ndarray, timesteps: Sequence[int]) -> np.ndarray:
    abar = np.asarray(alphas_cumprod, np.float64)[np.asarray(timesteps)]
    return np.log(abar / (1 - abar))


def split_by_snr(snr: np.ndarray, num_groups: int) -> np.ndarray:
    """Group index (0 .. K-1, in the order of `snr`) of each of the n entries: contiguous groups
    minimising the summed squared distance to each group's mean, sizes in [n // 2K, ceil(3n/2K)]."""
    n = len(snr)
    low, high = n // (2 * num_groups), -(-3 * n // (2 * num_groups))
    if num_groups < 1 or num_groups * max(low, 1) > n or num_groups * high < n:
        raise ValueError(f"cannot split {n} timesteps into {num_groups} groups")
    prefix = np.concatenate([[0.0], np.cumsum(snr)])
    prefix_sq = np.concatenate([[0.0], np.cumsum(np.square(snr))])

    def cost(a: int, b: int) -> float:  # squared distances to the mean of snr[a:b]
        total = prefix[b] - prefix[a]
        return prefix_sq[b] - prefix_sq[a] - total * total / (b - a)

    best = np.full((num_groups + 1, n + 1), np.inf)
    start = np.zeros((num_groups + 1, n + 1), np.int64)
    best[0, 0] = 0.0
    for k in range(1, num_groups + 1):
        for b in range(1, n + 1):
            for a in range(max(0, b - high), b - max(low, 1) + 1):
                value = best[k - 1, a] + cost(a, b)
                if value < best[k, b]:
                    best[k, b], start[k, b] = value, a
    groups = np.empty(n, np.int64)
    b = n
    for k in range(num_groups, 0, -1):
        a = start[k, b]
        groups[a:b] = k - 1
        b = a
    return groups


def allocate_widths(difficulty: Sequence[float], group_sizes: Sequence[int],
                    width_macs: Sequence[float], budget: float) -> tuple[int, ...]:
    """A width index per group (into `width_macs`, full width first, narrowing): harder groups
    are never narrower, the mean MACs per step over all steps is at most `budget` x full width's,
    and among those the most MACs (then the smallest spread of widths). An error names the
    cheapest possible ratio when nothing fits."""
    difficulty = np.asarray(difficulty, np.float64)
    sizes = np.asarray(group_sizes, np.float64)
    macs = np.asarray(width_macs, np.float64)
    order = np.argsort(-difficulty, kind="stable")  # hardest first
    best, best_key = None, None
    for choice in itertools.product(range(len(macs)), repeat=len(difficulty)):
        choice = np.asarray(choice)
        if np.any(np.diff(choice[order]) < 0):  # an easier group wider than a harder one
            continue
        ratio = float(np.dot(sizes, macs[choice]) / sizes.sum() / macs[0])
        if ratio > budget + 1e-12:
            continue
        key = (ratio, -float(np.ptp(choice)))
        if best_key is None or key > best_key:
            best, best_key = tuple(int(i) for i in choice), key
    if best is None:
        raise ValueError(f"no allocation fits a MACs budget of {budget:g}; the cheapest costs "
                         f"{macs.min() / macs[0]:.3f} of full width")
    return best
