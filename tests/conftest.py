"""Test session set-up: 8 simulated CPU devices and a persistent compilation cache.

Both must happen before JAX is first imported.
"""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # even where libtpu is installed (tests/test_aot.py)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("DDSM_JAX_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".jax_cache"))

from ddsm_jax.utils.compilation_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()
