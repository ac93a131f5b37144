"""The simplified DDPM training objective."""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from ddsm_jax.diffusion.schedules import Diffusion, q_sample

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def noisy_batch(diffusion: Diffusion, x0: jax.Array, key: jax.Array,
                t_range: tuple[int, int] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x_t, t, noise) for a training batch, t and noise drawn from `key`; t uniform on
    [t_range[0], t_range[1]) (default: every timestep)."""
    chex.assert_rank(x0, 4)
    t_key, noise_key = jax.random.split(key)
    low, high = t_range if t_range is not None else (0, diffusion.num_timesteps)
    t = jax.random.randint(t_key, (x0.shape[0],), low, high, dtype=jnp.int32)
    noise = jax.random.normal(noise_key, x0.shape, dtype=jnp.float32)
    return q_sample(diffusion, x0.astype(jnp.float32), t, noise), t, noise


def epsilon_loss(eps_fn: EpsFn, diffusion: Diffusion, x0: jax.Array, key: jax.Array,
                 t_range: tuple[int, int] | None = None) -> jax.Array:
    """Unweighted noise-prediction MSE ("L_simple") on a `noisy_batch`."""
    x_t, t, noise = noisy_batch(diffusion, x0, key, t_range)
    eps = eps_fn(x_t, t)
    chex.assert_shape(eps, x0.shape)
    return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise))
