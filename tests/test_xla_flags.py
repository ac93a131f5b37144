"""The package gives XLA:CPU's convolutions to XLA's own kernels, not YNNPACK's (utils/xla_flags)."""

import jax
import jax.numpy as jnp

from ddsm_jax.models.conv import conv2d
from ddsm_jax.utils import xla_flags


def test_the_flag_is_appended_and_a_users_own_setting_kept():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_flags.prefer_xla_convolutions(environ)
    assert environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
    assert not xla_flags.prefer_xla_convolutions(environ)  # once only
    own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
    assert not xla_flags.prefer_xla_convolutions(own)
    assert own == {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
    empty = {}
    assert xla_flags.prefer_xla_convolutions(empty)
    assert empty["XLA_FLAGS"] == xla_flags.XLA_CONVOLUTIONS


def test_an_unknown_jaxlib_release_is_left_alone(monkeypatch):
    # XLA aborts the process on a flag it does not know.
    monkeypatch.setattr(xla_flags, "_jaxlib_release", lambda: (0, 99))
    environ = {}
    assert not xla_flags.prefer_xla_convolutions(environ)
    assert environ == {}


def test_compiled_convolutions_are_not_ynnpack_fusions():
    # This process imported ddsm_jax before JAX started (tests/conftest.py): the flag reached XLA.
    x, kernel = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))  # YNNPACK skips tinier ones
    text = jax.jit(conv2d).lower(x, kernel).compile().as_text()
    assert "convolution(" in text
    assert "__ynn_fusion" not in text
    # ...while the same program compiled with jaxlib's default set is one.
    default = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
    assert "__ynn_fusion" in jax.jit(conv2d).lower(x, kernel).compile(default).as_text()
