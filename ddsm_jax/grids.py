"""Sample grids per width from one set of weights, all from the same noise, so they compare."""

from __future__ import annotations

import ml_collections
import numpy as np
from etils import epath

from ddsm_jax.common_types import Params, PathLike
from ddsm_jax.diffusion.schedules import Diffusion
from ddsm_jax.layout import Stream, stream_key
from ddsm_jax.models.cost import SchedulePrices
from ddsm_jax.models.network import Network
from ddsm_jax.sampling import ScheduleSampler, sample_in_batches, stream_draws
from ddsm_jax.utils.images import make_grid, save_grid
from ddsm_jax.utils.plots import save_side_by_side


class WidthGrids:
    """Draws `width_<w>.png` per global width and `widths.png` (side by side, with their MACs).

    The sampler and the noise are made once, so drawing again during training recompiles nothing.
    """

    def __init__(self, config: ml_collections.ConfigDict, network: Network, diffusion: Diffusion):
        self.network = network
        self.batch_size = config.sampling.batch_size
        self.sampler = ScheduleSampler(network, diffusion, config.sampling)
        self.noise, self.key = stream_draws(stream_key(config.seed, Stream.GRIDS),
                                            config.sampling.num_samples, network.image_shape)
        self.config = config
        self.prices = None

    def sample(self, params: Params) -> list[np.ndarray]:
        return [sample_in_batches(self.sampler, params, self.sampler.uniform(index), self.noise,
                                  self.key, self.batch_size)
                for index in self.network.global_indices]

    def draw(self, params: Params, out_dir: PathLike) -> tuple[list[epath.Path], np.ndarray]:
        """Writes the PNGs; returns their paths and the side-by-side grid of all widths."""
        if self.prices is None:
            self.prices = SchedulePrices.of(self.network, params, self.sampler.timesteps,
                                            self.config)
        paths, grids, titles = [], [], []
        for index, images in zip(self.network.global_indices, self.sample(params)):
            width = self.network.widths[index]
            paths.append(save_grid(images, epath.Path(out_dir) / f"width_{width}.png"))
            grids.append(make_grid(images, padding=1, scale=4))
            mean_macs = self.prices.per_step[:, index].mean()
            titles.append(f"width {width}: {mean_macs / 1e6:.1f} MMACs")
        paths.append(save_side_by_side(grids, titles, epath.Path(out_dir) / "widths.png"))
        return paths, np.concatenate(grids, axis=1)
