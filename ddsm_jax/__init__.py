"""Denoising Diffusion Step-aware Models in JAX."""

from ddsm_jax.utils.xla_flags import prefer_xla_convolutions

# Before JAX starts its backends, which read XLA_FLAGS once (see utils/xla_flags.py).
prefer_xla_convolutions()

from ddsm_jax.utils.threefry import unroll_threefry_on_cpu  # noqa: E402  (imports jax)

unroll_threefry_on_cpu()
