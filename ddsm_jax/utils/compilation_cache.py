"""A persistent XLA compilation cache: a second run skips most of its ~20 s compiles."""

from __future__ import annotations

import os
from pathlib import Path

import jax

DEFAULT_DIR = Path(os.environ.get("DDSM_JAX_CACHE_DIR", Path.home() / ".cache" / "ddsm_jax" / "xla"))


def enable_compilation_cache(directory: str | Path = DEFAULT_DIR) -> None:
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
