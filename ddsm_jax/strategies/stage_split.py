"""Timestep stages for the multi-stage strategy (Zhang, Lu et al., arXiv 2312.09181), from the
optimal denoiser over the training set.

For x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z, the denoiser that minimises the training loss on a
finite training set Y is exact: E[x0 | x_t] = sum_y w_y(x_t) y with w = softmax over y of
-|x_t - sqrt(abar_t) y|^2 / (2 (1 - abar_t)). The paper compares the optimal outputs of one
(x0, z) pair at a grid of times: two times are similar where the outputs agree on most pixels
(within 2/256 of the pixel range), and the stages are the contiguous intervals of the grid that
maximise the summed mean similarity inside each interval. On our embedded data (hundreds to a few
thousand small images) every optimal output is one matmul and a softmax, so this is exact, not
a learned estimate; the paper's 21-point grid is small enough to try every split.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The paper's grid: t = 1e-3 in steps of 0.05, plus 1 (continuous time in [0, 1]).
PAPER_GRID = tuple(float(t) for t in np.append(np.arange(1e-3, 1.0, 0.05), 1.0))
# Two outputs agree on a pixel within 2/256 of the pixel range; our pixels span [-1, 1].
AGREEMENT = 2 * 2 / 256


def grid_timesteps(num_timesteps: int, grid: Sequence[float] = PAPER_GRID) -> np.ndarray:
    """The discrete timesteps (0 .. T-1) nearest to continuous times in [0, 1]."""
    return np.clip(np.rint(np.asarray(grid) * (num_timesteps - 1)), 0, num_timesteps - 1
                   ).astype(np.int32)


@jax.jit
def optimal_denoiser(x_t: jax.Array, alpha_bar: jax.Array, train: jax.Array) -> jax.Array:
    """E[x0 | x_t] over the training images `train` (M, D), for noisy images `x_t` (N, D) at
    the noise level `alpha_bar` (scalar): (N, D)."""
    scale = jnp.sqrt(alpha_bar)
    # |x - s y|^2 = |x|^2 - 2 s x.y + s^2 |y|^2; the |x|^2 term cancels in the softmax.
    logits = (2 * scale * x_t @ train.T - alpha_bar * jnp.sum(train**2, axis=1)) / (
        2 * (1 - alpha_bar))
    return jax.nn.softmax(logits, axis=1) @ train


def similarity_matrix(train: np.ndarray, alphas_cumprod: np.ndarray, timesteps: Sequence[int],
                      num_pairs: int = 256, seed: int = 0,
                      agreement: float = AGREEMENT) -> np.ndarray:
    """(G, G): the mean over `num_pairs` random (x0 from `train`, z) pairs of the fraction of
    pixels on which the optimal outputs at timesteps i and j agree within `agreement`."""
    flat = jnp.asarray(np.asarray(train, np.float32).reshape(len(train), -1))
    rng = np.random.default_rng(seed)
    x0 = flat[rng.integers(0, len(train), num_pairs)]
    z = jnp.asarray(rng.standard_normal(x0.shape, np.float32))
    outputs = []
    for t in timesteps:
        alpha_bar = jnp.float32(alphas_cumprod[int(t)])
        outputs.append(optimal_denoiser(jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1 - alpha_bar) * z,
                                        alpha_bar, flat))
    stacked = jnp.stack(outputs)  # (G, N, D)
    agree = jnp.abs(stacked[:, None] - stacked[None, :]) <= agreement  # (G, G, N, D)
    return np.asarray(agree.mean(axis=(2, 3)), np.float64)


def best_split(similarity: np.ndarray, num_stages: int) -> tuple[int, ...]:
    """The grid indices where stages 2..K begin: the contiguous split into `num_stages`
    intervals with the largest sum of mean within-interval similarity (every split is tried)."""
    size = similarity.shape[0]
    if not 1 <= num_stages <= size:
        raise ValueError(f"num_stages={num_stages} must lie in [1, {size}] for a grid of {size}")

    def score(cuts: tuple[int, ...]) -> float:
        bounds = (0, *cuts, size)
        return sum(similarity[a:b, a:b].mean() for a, b in itertools.pairwise(bounds))

    return max(itertools.combinations(range(1, size), num_stages - 1), key=score)


def stage_boundaries(train: np.ndarray, alphas_cumprod: np.ndarray, num_stages: int = 3, *,
                     grid: Sequence[float] = PAPER_GRID, num_pairs: int = 256,
                     seed: int = 0) -> tuple[int, ...]:
    """The timesteps (of T = len(alphas_cumprod)) at which stages 2..K begin, in increasing t:
    stage k covers timesteps [boundary[k-1], boundary[k])."""
    timesteps = grid_timesteps(len(alphas_cumprod), grid)
    similarity = similarity_matrix(train, alphas_cumprod, timesteps, num_pairs, seed)
    cuts = best_split(similarity, num_stages)
    # A stage begins halfway between the last grid time of one interval and the first of the next.
    return tuple(int((timesteps[c - 1] + timesteps[c] + 1) // 2) for c in cuts)


def stage_of(timesteps: np.ndarray | int, boundaries: Sequence[int]) -> np.ndarray:
    """The stage index (0 = least noisy) of each timestep."""
    return np.searchsorted(np.asarray(boundaries), np.asarray(timesteps), side="right")


def stage_ranges(boundaries: Sequence[int], num_timesteps: int) -> tuple[tuple[int, int], ...]:
    """[first, last + 1) timesteps of each stage; a clear error for boundaries out of order."""
    edges = (0, *(int(b) for b in boundaries), num_timesteps)
    if any(a >= b for a, b in itertools.pairwise(edges)):
        raise ValueError(f"stage boundaries {tuple(boundaries)} must increase strictly "
                         f"within (0, {num_timesteps}): the first timestep of stages 2..K")
    return tuple(itertools.pairwise(edges))
