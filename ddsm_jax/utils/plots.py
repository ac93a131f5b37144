"""Figures for people: sample grids side by side with what each one cost."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
from etils import epath

from ddsm_jax.common_types import PathLike

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ddsm_jax.utils.files import write_atomically


def save_side_by_side(grids: Sequence[np.ndarray], titles: Sequence[str], path: PathLike, *,
                      caption: str | None = None) -> epath.Path:
    """One row of uint8 HWC grids with a title each (and a caption above them all), written
    atomically as a PNG."""
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6), squeeze=False)
    if caption:
        fig.suptitle(caption, fontsize=10)
    for ax, grid, title in zip(axes[0], grids, titles):
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def save_figure(fig, path: PathLike, *, dpi: int = 110) -> epath.Path:
    """Writes `fig` atomically as a PNG at `path` and closes it."""
    path = write_atomically(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi))
    plt.close(fig)
    return path
