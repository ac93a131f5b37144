"""Test helpers: tiny configs derived from the real ones (`configs/digits.py:tiny`), so tests
exercise the same code paths quickly, and what a program lowered for a given platform contains."""

from functools import partial

import jax
import jax.numpy as jnp

from ddsm_jax.configs import digits


def tiny_config(num_steps: int = 8, **model_overrides):
    """`configs/digits.py:tiny` with the few training steps and small batches a test needs."""
    config = digits.get_config("tiny")
    config.training.batch_size = 16
    config.training.num_steps = num_steps
    config.training.warmup_steps = 2
    config.training.log_every = 2
    config.training.checkpoint_every = 4
    config.sampling.num_samples = 8
    config.sampling.batch_size = 8
    for name, value in model_overrides.items():
        config.model[name] = value
    return config


def lowered_op_count(fn, *args, platform: str, op: str) -> int:
    """How often StableHLO `op` occurs in `fn(*args)` lowered for `platform` (no device of that
    platform needed): what platform-dependent code leaves in each platform's program."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text().count(op)


def macs_agreeing_with_xla(network, params, tolerance: float, **branch):
    """The tracer's MACs of one branch (a `MacCounter`), checked against XLA's cost analysis of
    the same program on two images: 2 FLOPs per MAC, padding taps left out as XLA does."""
    from ddsm_jax.models.cost import width_macs

    counter = width_macs(network, params, **branch)
    x = jax.ShapeDtypeStruct((2, *network.image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    xla_flops = jax.jit(partial(network.apply, **branch)).lower(params, x, t).cost_analysis()["flops"]
    ours = 2 * 2 * (counter.total - counter.conv_padding)
    assert abs(ours - xla_flops) / xla_flops < tolerance, (branch, ours, xla_flops)
    return counter
