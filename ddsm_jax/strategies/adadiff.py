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

from ddsm_jax.common_types import Params
from ddsm_jax.diffusion.schedules import Diffusion, q_sample
from ddsm_jax.models.early_exit_unet import exit_blocks
from ddsm_jax.models.network import Network


def early_exit_loss(network: Network, diffusion: Diffusion, params: Params, x0: jax.Array,
                    key: jax.Array, depths: tuple[float, ...], *, uncertainty_weight: float,
                    layer_weight: float, plain_layer_weight: float
                    ) -> tuple[jax.Array, jax.Array]:
    """The loss of one batch (one t and noise per image, every exit), and each depth's epsilon
    MSE in the order of `depths` (for the log)."""
    t_key, noise_key, dropout_key = jax.random.split(key, 3)
    t = jax.random.randint(t_key, (x0.shape[0],), 0, diffusion.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(noise_key, x0.shape, dtype=jnp.float32)
    x_t = q_sample(diffusion, x0.astype(jnp.float32), t, noise)
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
