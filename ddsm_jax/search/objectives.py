"""Ranking candidates by (FD, MACs): DDSM's weighted sum, a hard budget, or the Pareto front.

Every objective is a total order over candidates (`ranking`), so survivor selection, tournaments
and the final choice share one definition of "better".
"""

from __future__ import annotations

import numpy as np

OBJECTIVES = ("weighted", "budget", "pareto")


def pareto_ranks(fd: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Non-dominated sorting (NSGA-II): rank 0 is the front, rank 1 the front without it, ..."""
    fd, cost = np.asarray(fd, np.float64), np.asarray(cost, np.float64)
    count = len(fd)
    no_worse = (fd[:, None] <= fd[None, :]) & (cost[:, None] <= cost[None, :])
    better = (fd[:, None] < fd[None, :]) | (cost[:, None] < cost[None, :])
    dominates = no_worse & better  # dominates[i, j]: i dominates j
    dominated_by = dominates.sum(axis=0)
    ranks = np.full(count, -1)
    rank, current = 0, np.flatnonzero(dominated_by == 0)
    while current.size:
        ranks[current] = rank
        dominated_by = dominated_by - dominates[current].sum(axis=0)
        dominated_by[ranks >= 0] = -1
        current = np.flatnonzero(dominated_by == 0)
        rank += 1
    return ranks


def crowding_distance(fd: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """NSGA-II's spread measure within one front; the extremes are kept at any price."""
    points = np.stack([np.asarray(fd, np.float64), np.asarray(cost, np.float64)], axis=1)
    distance = np.zeros(len(points))
    if len(points) <= 2:
        return np.full(len(points), np.inf)
    for column in points.T:
        order = np.argsort(column, kind="stable")
        span = column[order[-1]] - column[order[0]]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0:
            distance[order[1:-1]] += (column[order[2:]] - column[order[:-2]]) / span
    return distance


def ranking(objective: str, fd: np.ndarray, macs_mean: np.ndarray, macs_ratio: np.ndarray, *,
            macs_lambda: float = 0.0, macs_budget: float = 1.0) -> np.ndarray:
    """Indices from best to worst. Ties break on the index, so the order is deterministic."""
    fd, macs_mean, macs_ratio = (np.asarray(a, np.float64) for a in (fd, macs_mean, macs_ratio))
    index = np.arange(len(fd))
    if objective == "weighted":  # DDSM: FID + lambda * mean MMACs
        return np.lexsort((index, fitness("weighted", fd, macs_mean, macs_ratio,
                                          macs_lambda=macs_lambda)))
    if objective == "budget":  # feasible first by FD, then infeasible by how far over budget
        excess = np.maximum(macs_ratio - macs_budget, 0.0)
        return np.lexsort((index, np.where(excess > 0, excess, fd), excess > 0))
    if objective == "pareto":
        ranks = pareto_ranks(fd, macs_ratio)
        crowding = np.zeros(len(fd))
        for rank in np.unique(ranks):
            members = ranks == rank
            crowding[members] = crowding_distance(fd[members], macs_ratio[members])
        return np.lexsort((index, -crowding, ranks))
    raise ValueError(f"unknown search objective {objective!r}; choose one of {OBJECTIVES}")


def fitness(objective: str, fd: np.ndarray, macs_mean: np.ndarray, macs_ratio: np.ndarray, *,
            macs_lambda: float = 0.0, macs_budget: float = 1.0) -> np.ndarray:
    """A scalar per candidate for progress reports (lower is better); the rank decides."""
    fd = np.asarray(fd, np.float64)
    if objective == "weighted":
        return fd + macs_lambda * np.asarray(macs_mean, np.float64) / 1e6
    if objective == "budget":
        return np.where(np.asarray(macs_ratio) <= macs_budget, fd, np.inf)
    return fd


def choose(objective: str, fd: np.ndarray, macs_mean: np.ndarray, macs_ratio: np.ndarray, *,
           full_fd: float, fd_tolerance: float, macs_lambda: float = 0.0,
           macs_budget: float = 1.0) -> int:
    """The schedule to keep. For the Pareto objective: the cheapest front member whose FD is
    within `fd_tolerance` of full width's (on the same noise); the best FD if none is."""
    if objective != "pareto":
        return int(ranking(objective, fd, macs_mean, macs_ratio, macs_lambda=macs_lambda,
                           macs_budget=macs_budget)[0])
    fd, macs_ratio = np.asarray(fd, np.float64), np.asarray(macs_ratio, np.float64)
    good = np.flatnonzero(fd <= full_fd * (1.0 + fd_tolerance))
    if good.size == 0:
        return int(np.lexsort((macs_ratio, fd))[0])
    return int(good[np.lexsort((fd[good], macs_ratio[good]))[0]])


def spread_front(fd: np.ndarray, cost: np.ndarray, size: int) -> np.ndarray:
    """Up to `size` members of the Pareto front of (FD, cost), spread evenly over cost from the
    cheapest to the dearest, by cost: the schedules that offer a choice of price."""
    cost = np.asarray(cost, np.float64)
    front = np.flatnonzero(pareto_ranks(fd, cost) == 0)
    front = front[np.lexsort((front, cost[front]))]
    if size <= 0 or front.size <= size:
        return front[:max(size, 0)]
    targets = np.linspace(cost[front[0]], cost[front[-1]], size)
    picked = dict.fromkeys(int(front[np.argmin(np.abs(cost[front] - target))])
                           for target in targets)
    return np.asarray(list(picked), np.int64)


def shortlist(objective: str, fd: np.ndarray, macs_mean: np.ndarray, macs_ratio: np.ndarray,
              size: int, *, full_fd: float, fd_tolerance: float, macs_lambda: float = 0.0,
              macs_budget: float = 1.0) -> np.ndarray:
    """The `size` candidates worth a second, more careful score: the best by the ranking, or for
    the Pareto objective the front members around the one `choose` takes, by cost."""
    if objective != "pareto":
        return ranking(objective, fd, macs_mean, macs_ratio, macs_lambda=macs_lambda,
                       macs_budget=macs_budget)[:size]
    front = np.flatnonzero(pareto_ranks(fd, macs_ratio) == 0)
    front = front[np.lexsort((front, np.asarray(macs_ratio)[front]))]
    pick = choose(objective, fd, macs_mean, macs_ratio, full_fd=full_fd,
                  fd_tolerance=fd_tolerance)
    at = int(np.flatnonzero(front == pick)[0]) if pick in front else 0
    start = int(np.clip(at - size // 2, 0, max(len(front) - size, 0)))
    return front[start:start + size]
