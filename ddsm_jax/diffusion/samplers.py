"""Step-aware DDPM and DDIM samplers.

A step-aware sampler gets several denoisers (one per network width) and a width schedule with one
index per sampling step. Each sampler is a single `lax.scan` whose body picks the step's denoiser
with `lax.switch` on a scalar index, so only that branch executes; the compiled program is the
same for every schedule, and a new schedule is just new data.

Common random numbers: the noise of step i is always drawn from `fold_in(key, i)`, so samples
from two schedules with the same key differ only through the denoisers, not through the noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ddsm_jax.diffusion.schedules import Diffusion, extract, predict_x0_from_eps, q_posterior_mean

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]

SAMPLERS = ("ddpm", "ddim")
DDPM_VARIANCES = ("fixedlarge", "fixedsmall")
DDIM_SPACINGS = ("uniform", "quadratic")


def _as_eps_fns(eps_fns: Sequence[EpsFn] | EpsFn) -> tuple[EpsFn, ...]:
    fns = (eps_fns,) if callable(eps_fns) else tuple(eps_fns)
    if not fns:
        raise ValueError("eps_fns must hold at least one denoiser")
    return fns


def _check_width_schedule(width_schedule: jax.Array, num_steps: int, num_fns: int) -> jax.Array:
    shape = np.shape(width_schedule)
    if len(shape) != 1 or shape[0] != num_steps:
        raise ValueError(f"width_schedule has shape {shape} ({int(np.prod(shape))} entries) but the "
                         f"sampler runs {num_steps} steps; give one width index per step")
    try:  # values can only be checked when concrete; under jit lax.switch clamps instead
        values = np.asarray(width_schedule)
    except jax.errors.TracerArrayConversionError:
        values = None
    if values is not None and values.size and (values.min() < 0 or values.max() >= num_fns):
        raise ValueError(f"width_schedule indices must lie in [0, {num_fns}), got "
                         f"[{values.min()}, {values.max()}]")
    return jnp.asarray(width_schedule, dtype=jnp.int32)


def _step_eps(eps_fns: tuple[EpsFn, ...], index: jax.Array, x: jax.Array,
              t_batch: jax.Array) -> jax.Array:
    """Runs only the scheduled denoiser (a scalar switch, so one branch executes)."""
    if len(eps_fns) == 1:
        eps = eps_fns[0](x, t_batch)
    else:
        eps = jax.lax.switch(index, eps_fns, x, t_batch)
    return eps.astype(x.dtype)


def _step_noise(key: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.fold_in(key, step), shape, dtype=jnp.float32)


def _ddpm_log_variance(diffusion: Diffusion, variance: str) -> jax.Array:
    if variance == "fixedlarge":
        # The DDPM release uses beta_t as the variance, except the (unused) t = 0 entry.
        return jnp.log(jnp.concatenate([diffusion.posterior_variance[1:2], diffusion.betas[1:]]))
    if variance == "fixedsmall":
        return diffusion.posterior_log_variance_clipped
    raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {DDPM_VARIANCES}")


StepUpdate = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
# `transition(x, eps, t, t_prev, step, key) -> x_prev`: one step from timestep t to t_prev (-1:
# the end); `step` keys the step's noise.
Transition = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array],
                      jax.Array]


def transition(diffusion: Diffusion, *, method: str, eta: float = 0.0,
               variance: str = "fixedlarge", clip_denoised: bool = False) -> Transition:
    """The update of the images from t to t_prev given the denoiser's output, with the
    timesteps as values: the search that also chooses the timesteps runs each candidate's own.
    DDPM always goes to t - 1 and ignores t_prev."""
    if method == "ddpm":
        log_variance = _ddpm_log_variance(diffusion, variance)

        def ddpm(x, eps, t, t_prev, step, key):
            del t_prev
            t_batch = jnp.full((x.shape[0],), t, dtype=jnp.int32)
            x0 = predict_x0_from_eps(diffusion, x, t_batch, eps)
            if clip_denoised:
                x0 = jnp.clip(x0, -1.0, 1.0)
            mean = q_posterior_mean(diffusion, x0, x, t_batch)
            std = jnp.exp(0.5 * extract(log_variance, t_batch, x.ndim))
            noise = _step_noise(key, step, x.shape)
            return mean + jnp.where(t > 0, 1.0, 0.0) * std * noise

        return ddpm
    if method == "ddim":

        def ddim(x, eps, t, t_prev, step, key):
            t_batch = jnp.full((x.shape[0],), t, dtype=jnp.int32)
            x0 = predict_x0_from_eps(diffusion, x, t_batch, eps)
            if clip_denoised:
                x0 = jnp.clip(x0, -1.0, 1.0)
            a_t = diffusion.alphas_cumprod[t]
            a_prev = jnp.where(t_prev >= 0, diffusion.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
            sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t)) * jnp.sqrt(1.0 - a_t / a_prev)
            direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0))
            noise = _step_noise(key, step, x.shape)
            return jnp.sqrt(a_prev) * x0 + direction * eps + sigma * noise

        return ddim
    raise ValueError(f"unknown sampler {method!r}; choose one of {SAMPLERS}")


def previous_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """Each sampling step's destination: the next visited timestep, -1 after the last."""
    timesteps = np.asarray(timesteps)
    return np.concatenate([timesteps[..., 1:], np.full((*timesteps.shape[:-1], 1), -1)],
                          axis=-1).astype(np.int32)


def step_update(diffusion: Diffusion, *, method: str, timesteps: np.ndarray, eta: float = 0.0,
                variance: str = "fixedlarge", clip_denoised: bool = False) -> StepUpdate:
    """`update(x, eps, step, key) -> x_prev`: sampling step `step` (an index into `timesteps`)
    given the denoiser's output. The samplers below and the search's population evaluator both
    build their loops from `transition`, so a searched schedule is scored by exactly the sampler
    it runs on.
    """
    timesteps = _check_timesteps(timesteps, diffusion.num_timesteps)
    move = transition(diffusion, method=method, eta=eta, variance=variance,
                      clip_denoised=clip_denoised)
    t_of, t_prev_of = jnp.asarray(timesteps), jnp.asarray(previous_timesteps(timesteps))

    def update(x, eps, step, key):
        return move(x, eps, t_of[step], t_prev_of[step], step, key)

    return update


def _scan_sample(eps_fns: tuple[EpsFn, ...], update: StepUpdate, timesteps: np.ndarray,
                 widths: jax.Array, x_T: jax.Array, key: jax.Array) -> jax.Array:
    def eps_of(x, t_batch, width_index):
        return _step_eps(eps_fns, width_index, x, t_batch), None

    return scan_steps(eps_of, update, timesteps, widths, x_T, key)[0]


def scan_steps(eps_of: Callable, update: StepUpdate, timesteps: np.ndarray, per_step: Any,
               x_T: jax.Array, key: jax.Array) -> tuple[jax.Array, Any]:
    """The sampling loop: `eps_of(x, t_batch, per_step[step]) -> (eps, aux)` at every step;
    returns the clipped images and the stacked `aux` (what a denoiser with data-dependent
    compute, AdaDiff's exits, reports of each step)."""
    x_T = x_T.astype(jnp.float32)
    t_of = jnp.asarray(timesteps, dtype=jnp.int32)

    def body(x, inputs):
        value, step = inputs
        t_batch = jnp.full((x.shape[0],), t_of[step], dtype=jnp.int32)
        eps, aux = eps_of(x, t_batch, value)
        return update(x, eps.astype(x.dtype), step, key), aux

    steps = jnp.arange(len(timesteps), dtype=jnp.int32)
    x0, aux = jax.lax.scan(body, x_T, (per_step, steps))
    return jnp.clip(x0, -1.0, 1.0), aux


def ddpm_sample(eps_fns: Sequence[EpsFn], diffusion: Diffusion, width_schedule: jax.Array,
                x_T: jax.Array, key: jax.Array, variance: str = "fixedlarge",
                clip_denoised: bool = False) -> jax.Array:
    """Ancestral sampling over all T steps, t = T-1 ... 0, with a per-step denoiser."""
    eps_fns = _as_eps_fns(eps_fns)
    chex.assert_rank(x_T, 4)
    timesteps = np.arange(diffusion.num_timesteps - 1, -1, -1)
    widths = _check_width_schedule(width_schedule, len(timesteps), len(eps_fns))
    update = step_update(diffusion, method="ddpm", timesteps=timesteps, variance=variance,
                         clip_denoised=clip_denoised)
    return _scan_sample(eps_fns, update, timesteps, widths, x_T, key)


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> np.ndarray:
    """The DDIM sub-sequence of timesteps, returned in sampling (descending) order."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"DDIM needs 1 <= num_steps <= num_timesteps, got num_steps={num_steps} "
                         f"with num_timesteps={num_timesteps}")
    if spacing == "uniform":
        ascending = np.arange(0, num_timesteps, num_timesteps // num_steps)[:num_steps]
    elif spacing == "quadratic":
        ascending = (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM spacing {spacing!r}; choose one of {DDIM_SPACINGS}")
    if np.any(np.diff(ascending) <= 0):
        raise ValueError(f"{spacing} spacing of {num_steps} steps over {num_timesteps} timesteps "
                         f"gives repeated timesteps {ascending.tolist()}; use fewer steps")
    return ascending[::-1].astype(np.int64)


def _check_timesteps(timesteps: np.ndarray, num_timesteps: int) -> np.ndarray:
    timesteps = np.asarray(timesteps)
    if timesteps.ndim != 1 or timesteps.size == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {timesteps.shape}")
    if np.any(np.diff(timesteps) >= 0):
        raise ValueError(f"timesteps must be strictly descending (sampling order), got {timesteps}")
    if timesteps.min() < 0 or timesteps.max() >= num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps}), got {timesteps}")
    return timesteps.astype(np.int32)


def ddim_sample(eps_fns: Sequence[EpsFn], diffusion: Diffusion, timesteps: np.ndarray,
                width_schedule: jax.Array, x_T: jax.Array, key: jax.Array, eta: float = 0.0,
                clip_denoised: bool = False) -> jax.Array:
    """Generalized DDIM over `timesteps` (static, descending); eta = 0 is deterministic."""
    eps_fns = _as_eps_fns(eps_fns)
    chex.assert_rank(x_T, 4)
    timesteps = _check_timesteps(timesteps, diffusion.num_timesteps)
    widths = _check_width_schedule(width_schedule, len(timesteps), len(eps_fns))
    update = step_update(diffusion, method="ddim", timesteps=timesteps, eta=eta,
                         clip_denoised=clip_denoised)
    return _scan_sample(eps_fns, update, timesteps, widths, x_T, key)


def sampling_timesteps(method: str, num_timesteps: int, num_steps: int | None = None,
                       spacing: str = "uniform") -> np.ndarray:
    """The timesteps a method visits, descending: what a width schedule is indexed against."""
    if method == "ddpm":
        if num_steps is not None and num_steps != num_timesteps:
            raise ValueError(f"DDPM always runs all {num_timesteps} steps, got num_steps={num_steps}")
        return np.arange(num_timesteps - 1, -1, -1)
    if method == "ddim":
        if num_steps is None:
            raise ValueError("DDIM needs num_steps")
        return ddim_timesteps(num_timesteps, num_steps, spacing)
    raise ValueError(f"unknown sampler {method!r}; choose one of {SAMPLERS}")


def sample(eps_fns: Sequence[EpsFn], diffusion: Diffusion, width_schedule: jax.Array,
           x_T: jax.Array, key: jax.Array, *, method: str, timesteps: np.ndarray | None = None,
           eta: float = 0.0, variance: str = "fixedlarge", clip_denoised: bool = False) -> jax.Array:
    """One entry point so configs can name the sampler; `timesteps` is only used by DDIM."""
    if method == "ddpm":
        if timesteps is not None:
            expected = sampling_timesteps("ddpm", diffusion.num_timesteps)
            if not np.array_equal(np.asarray(timesteps), expected):
                raise ValueError("DDPM visits every timestep T-1..0; it cannot take a sub-sequence")
        return ddpm_sample(eps_fns, diffusion, width_schedule, x_T, key, variance=variance,
                           clip_denoised=clip_denoised)
    if method == "ddim":
        if timesteps is None:
            raise ValueError("DDIM needs timesteps (see ddim_timesteps / sampling_timesteps)")
        return ddim_sample(eps_fns, diffusion, timesteps, width_schedule, x_T, key, eta=eta,
                           clip_denoised=clip_denoised)
    raise ValueError(f"unknown sampler {method!r}; choose one of {SAMPLERS}")
