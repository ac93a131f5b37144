"""Type aliases shared across the package, defined once."""

from __future__ import annotations

import os
from typing import Any

from etils import epath

# A model's parameters: a plain nested dict of arrays (flax NNX state as pure data).
Params = dict[str, Any]
# Anything `etils.epath.Path` accepts: local paths and URIs such as gs://bucket/dir.
PathLike = str | os.PathLike | epath.Path
