"""The two pictures of a search: the chosen width per step, and FD against MACs."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
from etils import epath

from ddsm_jax.common_types import PathLike

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from ddsm_jax.models.stage_widths import STAGE_NAMES
from ddsm_jax.utils.plots import save_figure
from ddsm_jax.width_schedule import WidthSchedule


def save_schedule_plot(schedule: WidthSchedule, path: PathLike) -> epath.Path:
    """Width per sampling step, noisiest step on the left, with the timestep it runs at; with a
    width per U-Net stage, one line per stage."""
    stages = schedule.stage_widths_per_step
    steps = np.arange(schedule.num_steps)
    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    if (stages == stages[:, :1]).all():
        ax.step(steps, stages[:, 0], where="mid", color="tab:blue", linewidth=1.8)
        ax.fill_between(steps, stages[:, 0], step="mid", alpha=0.2, color="tab:blue")
    else:  # offset a little, so that equal stages stay visible
        for offset, name, colour, values in zip((0.012, 0.0, -0.012), STAGE_NAMES,
                                                ("tab:green", "tab:orange", "tab:blue"), stages.T):
            ax.step(steps, values + offset, where="mid", color=colour, linewidth=1.6, label=name)
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(sorted(set(stages.ravel().tolist())))
    ax.set_ylim(0, stages.max() * 1.08)
    ax.set_ylabel("width")
    ticks = np.linspace(0, schedule.num_steps - 1, min(6, schedule.num_steps)).astype(int)
    ax.set_xticks(ticks, [f"{i}\nt={schedule.timesteps[i]}" for i in ticks])
    ax.set_xlabel("sampling step (noisy -> clean)")
    figures = schedule.figures
    title = f"{schedule.sampler.upper()}, {schedule.num_steps} steps"
    if "macs_ratio" in figures:
        title += f": {100 * (1 - figures['macs_ratio']):.0f}% of the MACs saved"
    if "fd" in figures and "full_fd" in figures:
        title += f", FD {figures['fd']:.3g} (full width {figures['full_fd']:.3g})"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def save_pareto_plot(fd: np.ndarray, macs_ratio: np.ndarray, front: Sequence[int],
                     uniform: Sequence[dict[str, float]], chosen: int,
                     path: PathLike, *, num_samples: int, title: str | None = None,
                     cost: str = "macs_ratio") -> epath.Path:
    """Every scored schedule, the front, the uniform widths and the chosen schedule, against
    their cost (`cost`: the field, "macs_ratio" or "seconds_ratio")."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter(macs_ratio, fd, s=8, color="0.75", label="scored schedules")
    front = list(front)
    ax.plot(macs_ratio[front], fd[front], "-o", color="tab:blue", markersize=4,
            label="Pareto front")
    ax.scatter([u[cost] for u in uniform], [u["fd"] for u in uniform], marker="s",
               s=40, color="tab:orange", zorder=3, label="uniform widths")
    for u in uniform:
        ax.annotate(f"{u['width']:g}", (u[cost], u["fd"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8, color="tab:orange")
    ax.scatter([macs_ratio[chosen]], [fd[chosen]], marker="*", s=180, color="tab:red", zorder=4,
               label="chosen")
    ax.set_xlabel("MACs per step / full width" if cost == "macs_ratio"
                  else "predicted time (measured per branch) / full width's")
    ax.set_ylabel(f"FD on the search's {num_samples} samples (same noise for all)")
    ax.set_yscale("log")
    for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
