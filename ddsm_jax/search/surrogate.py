"""A surrogate that ranks the search's children before they are sampled.

Scoring a child costs a sampling run per candidate; predicting its FD from the schedules scored
so far costs nothing. The model is ridge regression of log FD on which width each step runs
(one-hot per step; plus each step's timestep where the search chooses those too), fitted to
the archive every generation: a width's effect on quality depends mostly on the step it runs
at, which is what the one-hot features express. Only the children it ranks best
(`search.surrogate_keep` of them) are sampled; the others are dropped unscored.
"""

from __future__ import annotations

import numpy as np


def one_hot(schedules: np.ndarray, num_widths: int) -> np.ndarray:
    """(n, steps) width indices -> (n, steps * num_widths) indicators."""
    schedules = np.asarray(schedules, np.int64)
    count, steps = schedules.shape
    features = np.zeros((count, steps, num_widths))
    features[np.arange(count)[:, None], np.arange(steps)[None, :], schedules] = 1.0
    return features.reshape(count, steps * num_widths)


def features(genomes: np.ndarray, num_widths: int, num_steps: int | None = None,
             num_timesteps: int | None = None) -> np.ndarray:
    """The regression's inputs: each step's width one-hot, and where the genome also holds the
    steps' timesteps (after the `num_steps` widths), each as a fraction of `num_timesteps`."""
    genomes = np.asarray(genomes)
    num_steps = genomes.shape[1] if num_steps is None else num_steps
    parts = [one_hot(genomes[:, :num_steps], num_widths)]
    if genomes.shape[1] > num_steps:
        parts.append(genomes[:, num_steps:] / num_timesteps)
    return np.concatenate(parts, axis=1)


def predict_fd(scored: np.ndarray, fd: np.ndarray, candidates: np.ndarray, num_widths: int,
               ridge: float = 1.0, *, num_steps: int | None = None,
               num_timesteps: int | None = None) -> np.ndarray:
    """FD of `candidates` predicted from the `scored` genomes' `fd`."""
    x = features(scored, num_widths, num_steps, num_timesteps)
    y = np.log(np.asarray(fd, np.float64))
    mean_x, mean_y = x.mean(axis=0), y.mean()
    centred = x - mean_x
    weights = np.linalg.solve(centred.T @ centred + ridge * np.eye(x.shape[1]),
                              centred.T @ (y - mean_y))
    return np.exp(mean_y + (features(candidates, num_widths, num_steps, num_timesteps) - mean_x)
                  @ weights)
