"""Noise schedules and the closed-form quantities of the Gaussian diffusion process.

Everything is derived in float64 numpy (products of 1000 numbers close to one lose digits in
float32) and only then stored as float32 device arrays.
"""

from __future__ import annotations

import math

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

BETA_SCHEDULES = ("linear", "cosine")
_COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal (2021): keeps beta_0 from being vanishingly small
_MAX_BETA = 0.999  # clip so the cosine schedule never reaches beta = 1 at t = T - 1


def make_betas(kind: str, num_timesteps: int, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> np.ndarray:
    """Per-step noise variances, float64; `beta_start`/`beta_end` only matter for "linear"."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    if kind == "cosine":
        def alpha_bar(frac: np.ndarray) -> np.ndarray:
            return np.cos((frac + _COSINE_OFFSET) / (1.0 + _COSINE_OFFSET) * math.pi / 2) ** 2

        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        bars = alpha_bar(steps)
        return np.minimum(1.0 - bars[1:] / bars[:-1], _MAX_BETA)
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of {BETA_SCHEDULES}")


@flax.struct.dataclass
class Diffusion:
    """Per-timestep coefficients; a pytree so it can be closed over or passed through `jit`."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    num_timesteps: int = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, betas: np.ndarray) -> Diffusion:
        """Builds every coefficient from `betas` (at least two steps: t = 0 borrows from t = 1)."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(f"betas must be a 1-D array of at least 2 steps, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0; DDPM replaces it by the t = 1 value before the log.
        posterior_log_variance_clipped = np.log(
            np.append(posterior_variance[1], posterior_variance[1:]))
        f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
        return cls(
            betas=f32(betas),
            alphas_cumprod=f32(alphas_cumprod),
            alphas_cumprod_prev=f32(alphas_cumprod_prev),
            sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
            sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
            sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / alphas_cumprod)),
            sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / alphas_cumprod - 1.0)),
            posterior_variance=f32(posterior_variance),
            posterior_log_variance_clipped=f32(posterior_log_variance_clipped),
            posterior_mean_coef1=f32(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)),
            posterior_mean_coef2=f32((1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)),
            num_timesteps=int(betas.shape[0]),
        )


def diffusion_from_config(cfg: ml_collections.ConfigDict) -> Diffusion:
    """The `config.diffusion` block -> a Diffusion."""
    betas = make_betas(cfg.beta_schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    return Diffusion.create(betas)


def extract(coefs: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """Gathers one coefficient per example, shaped to broadcast over an image of rank `ndim`."""
    chex.assert_rank(t, 1)
    return jnp.take(coefs, t).reshape((t.shape[0],) + (1,) * (ndim - 1))


def q_sample(diffusion: Diffusion, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Draws x_t ~ q(x_t | x_0) in one shot, reusing the caller's noise (the loss target)."""
    chex.assert_equal_shape([x0, noise])
    chex.assert_shape(t, (x0.shape[0],))
    return (extract(diffusion.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def predict_x0_from_eps(diffusion: Diffusion, x_t: jax.Array, t: jax.Array,
                        eps: jax.Array) -> jax.Array:
    """Inverts q_sample given the predicted noise."""
    chex.assert_equal_shape([x_t, eps])
    chex.assert_shape(t, (x_t.shape[0],))
    return (extract(diffusion.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(diffusion.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def q_posterior_mean(diffusion: Diffusion, x0: jax.Array, x_t: jax.Array,
                     t: jax.Array) -> jax.Array:
    """Mean of q(x_{t-1} | x_t, x_0), the target of each ancestral step."""
    chex.assert_equal_shape([x0, x_t])
    chex.assert_shape(t, (x_t.shape[0],))
    return (extract(diffusion.posterior_mean_coef1, t, x_t.ndim) * x0
            + extract(diffusion.posterior_mean_coef2, t, x_t.ndim) * x_t)
