"""A persistent XLA compilation cache: a second run skips most of its ~20 s compiles."""

from __future__ import annotations

import os

import jax

from ddsm_jax.common_types import PathLike

# Local by default; JAX also takes a gs:// directory here (shared by the hosts of a pod).
DEFAULT_DIR = os.environ.get("DDSM_JAX_CACHE_DIR",
                             os.path.join(os.path.expanduser("~"), ".cache", "ddsm_jax", "xla"))


def enable_compilation_cache(directory: PathLike = DEFAULT_DIR) -> None:
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
