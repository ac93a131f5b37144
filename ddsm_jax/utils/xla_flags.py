"""XLA:CPU's own convolutions instead of YNNPACK's: the narrow sub-networks run 1.2-1.7x faster.

jaxlib 0.10 hands every CPU convolution to YNNPACK. On this project's CPUs its kernels reach
XLA's own (Eigen) speed only at 128 and 256 channels; at the channel counts a slimmable U-Net's
narrow widths have (32, 64, 96, 192) they ran at half to two thirds of it, forward and backward
(`python -m benchmarks.conv_channels --backends=ynnpack,xla`). The choice is an XLA flag read
once, when JAX starts its backends, so the package appends it to `XLA_FLAGS` when it is imported;
JAX initialised before that keeps YNNPACK (same results to float rounding, slower). Dots and
reductions stay with YNNPACK. A user's own setting of the flag is left as it is.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# The flag's value takes "-<type>" to drop one type from XLA's default set.
XLA_CONVOLUTIONS = f"{YNN_FUSION_FLAG}=-individual_convolution"
# XLA aborts the process on a flag or value it does not parse: set it only on the jaxlib
# releases it was tested with (0.10.2, the pinned one; others keep jaxlib's default).
KNOWN_JAXLIB = ((0, 10),)


def prefer_xla_convolutions(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Append `XLA_CONVOLUTIONS` to `environ["XLA_FLAGS"]`; False where left unchanged."""
    flags = environ.get("XLA_FLAGS", "")
    if YNN_FUSION_FLAG in flags or _jaxlib_release() not in KNOWN_JAXLIB:
        return False
    environ["XLA_FLAGS"] = f"{flags} {XLA_CONVOLUTIONS}".strip()
    return True


def _jaxlib_release() -> tuple[int, int] | None:
    try:
        major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
