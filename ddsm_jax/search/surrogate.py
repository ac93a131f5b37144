"""A surrogate that ranks the search's children before they are sampled.

Scoring a child costs a sampling run per candidate; predicting its FD from the schedules scored
so far costs nothing. The model is ridge regression of log FD on which width each step runs
(one-hot per step), fitted to the archive every generation: a width's effect on quality depends
mostly on the step it runs at, which is what the one-hot features express. Only the children it
ranks best (`search.surrogate_keep` of them) are sampled; the others are dropped unscored.
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


def predict_fd(scored: np.ndarray, fd: np.ndarray, candidates: np.ndarray, num_widths: int,
               ridge: float = 1.0) -> np.ndarray:
    """FD of `candidates` predicted from the `scored` schedules' `fd`."""
    x, y = one_hot(scored, num_widths), np.log(np.asarray(fd, np.float64))
    mean_x, mean_y = x.mean(axis=0), y.mean()
    centred = x - mean_x
    weights = np.linalg.solve(centred.T @ centred + ridge * np.eye(x.shape[1]),
                              centred.T @ (y - mean_y))
    return np.exp(mean_y + (one_hot(candidates, num_widths) - mean_x) @ weights)
