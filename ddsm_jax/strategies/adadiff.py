"""AdaDiff (Tang et al., arXiv 2309.17074): the uncertainty-aware layer-wise loss that trains
the early-exit U-Net (`models/early_exit_unet.py`), and its exit rule.

The paper's choices we keep: every exit trains at every step with the full network, each exit's
uncertainty target is tanh of its mean absolute error (a pseudo-label, not differentiated), and
its layer loss is weighted by (1 - u). Ours, where the paper is silent: the (1 - u) weight is not
differentiated either (else the network could lower its loss by claiming certainty), and the
unweighted layer loss of the public reproduction keeps exits learning while their u is high.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddsm_jax.common_types import Params
from ddsm_jax.diffusion import samplers
from ddsm_jax.diffusion.losses import noisy_batch
from ddsm_jax.diffusion.schedules import Diffusion
from ddsm_jax.models.early_exit_unet import exit_blocks
from ddsm_jax.models.network import Network
from ddsm_jax.sampling import ScheduleSampler, split_batch


def early_exit_loss(network: Network, diffusion: Diffusion, params: Params, x0: jax.Array,
                    key: jax.Array, depths: tuple[float, ...], *, uncertainty_weight: float,
                    layer_weight: float, plain_layer_weight: float
                    ) -> tuple[jax.Array, jax.Array]:
    """The loss of one batch (one t and noise per image, every exit), and each depth's epsilon
    MSE in the order of `depths` (for the log)."""
    batch_key, dropout_key = jax.random.split(key)
    x_t, t, noise = noisy_batch(diffusion, x0, batch_key)
    eps, uncertainty = network.apply(params, x_t, t, all_exits=True, dropout_rng=dropout_key)
    pixels = tuple(range(2, eps.ndim))
    squared = jnp.square(eps - noise[None]).mean(axis=pixels)  # (exits + 1, B)
    target = jax.lax.stop_gradient(jnp.tanh(jnp.abs(eps[:-1] - noise[None]).mean(axis=pixels)))
    exits = squared[:-1]
    loss = (squared[-1].mean()
            + uncertainty_weight * jnp.square(uncertainty - target).mean(axis=1).sum()
            + layer_weight * (jax.lax.stop_gradient(1.0 - uncertainty) * exits).mean(axis=1).sum()
            + plain_layer_weight * exits.mean(axis=1).sum())
    per_block = squared.mean(axis=1)  # one output per decoder block, the full network last
    return loss, jnp.stack([per_block[exit_blocks(d, len(per_block)) - 1] for d in depths])


def loss_of(config: ml_collections.ConfigDict) -> Callable:
    """`early_exit_loss` with the config's weights, as the train step's loss."""
    section = config.adadiff

    def loss(network, diffusion, params, x0, key, depths):
        return early_exit_loss(network, diffusion, params, x0, key, depths,
                               uncertainty_weight=section.uncertainty_weight,
                               layer_weight=section.layer_weight,
                               plain_layer_weight=section.plain_layer_weight)

    return loss


class ExitSampler:
    """AdaDiff's own sampling: at every step each sample leaves the network at the first exit
    whose estimated uncertainty is at most `threshold` (else it runs the whole network).

    Every exit is computed and each sample's is picked (`take_along_axis`): the images are
    exactly those of real per-sample exits, and the MACs are counted from the exits taken, but
    this program takes no less time than the full network. `per_batch`: the batch leaves where
    all its images are certain, through `lax.cond`s (never vmapped, which would run every
    branch), so that time falls with depth: what `evaluate` times. Same loop, step update and
    noise as `ScheduleSampler`.
    """

    def __init__(self, network: Network, diffusion: Diffusion,
                 sampling: ml_collections.ConfigDict, *, per_batch: bool = False):
        schedule_sampler = ScheduleSampler(network, diffusion, sampling)
        self.network = network
        self.per_batch = per_batch
        self.method = sampling.method
        self.timesteps = schedule_sampler.timesteps
        self.devices = schedule_sampler.devices
        self._update = schedule_sampler.step_update()
        self._jitted = jax.jit(self._sample)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def _sample(self, params: Params, threshold: jax.Array, x_T: jax.Array,
                key: jax.Array) -> tuple[jax.Array, jax.Array]:
        def eps_of(x, t_batch, _):
            if self.per_batch:
                eps, taken = self.network.apply(params, x, t_batch, threshold=threshold)
                return eps, jnp.full(x.shape[0], taken)
            eps, uncertainty = self.network.apply(params, x, t_batch, all_exits=True)
            certain = uncertainty <= threshold
            taken = jnp.where(certain.any(axis=0), jnp.argmax(certain, axis=0),
                              uncertainty.shape[0])
            return jnp.take_along_axis(eps, taken[None, :, None, None, None], axis=0)[0], taken

        steps = jnp.zeros(self.num_steps, jnp.int32)
        images, taken = samplers.scan_steps(eps_of, self._update, self.timesteps, steps, x_T, key)
        return images, taken.T  # (B, steps): decoder blocks run - 1

    def __call__(self, params: Params, threshold: float, x_T: jax.Array,
                 key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(images, the exit each sample took at each step, as decoder blocks run - 1); the batch
        split over the devices as `ScheduleSampler` splits it."""
        params, x_T, key = split_batch(self.devices, params, x_T, key)
        return self._jitted(params, jnp.float32(threshold), x_T, key)

    def block_macs(self, params: Params) -> np.ndarray:
        """MACs of one image leaving after each number of decoder blocks (1..all), from the
        tracer; the earlier exits' uncertainty estimators (a pooled linear each, under 0.1% of
        a block) are not added."""
        from ddsm_jax.models.cost import macs_table

        blocks = len(params["exits"]) + 1
        table = macs_table(self.network, params, widths=[k / blocks for k in range(1, blocks + 1)])
        return np.array([row["total"] for row in table.values()], np.float64)
