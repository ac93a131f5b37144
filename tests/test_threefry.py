"""Large draws take threefry's unrolled CPU lowering (utils/threefry.py), with the same bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

from ddsm_jax.utils import threefry

# Threefry-2x32 with 20 rounds: Random123's known answers, (key, counter) -> output.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


def _compiled(function, *args) -> str:
    return jax.jit(function).lower(*args).compile().as_text()


@pytest.mark.parametrize("count", [1, threefry.UNROLL_FROM])  # the loop, and unrolled
def test_both_lowerings_give_the_known_answers(count):
    for key, counter, expected in KNOWN_ANSWERS:
        # threefry_2x32 hashes pairs (count[i], count[n + i]).
        counters = jnp.asarray(np.repeat(np.asarray(counter, np.uint32), count))
        out = np.asarray(jax.jit(threefry_2x32)(jnp.asarray(key, jnp.uint32), counters))
        np.testing.assert_array_equal(out, np.repeat(np.asarray(expected, np.uint32), count))


def test_large_draws_are_unrolled_and_small_ones_keep_the_loop():
    # tests/conftest.py imports ddsm_jax, which registered the lowering.
    assert threefry.unroll_threefry_on_cpu()
    key = jax.random.key(0)
    assert "while" not in _compiled(lambda k: jax.random.bits(k, (threefry.UNROLL_FROM,)), key)
    assert "while" in _compiled(lambda k: jax.random.bits(k, (1000,)), key)


def test_an_unknown_jax_release_is_left_alone(monkeypatch):
    monkeypatch.setattr(threefry, "_jax_release", lambda: (0, 99))
    assert not threefry.unroll_threefry_on_cpu()
