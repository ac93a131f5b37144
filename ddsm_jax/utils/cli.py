"""Starting a command-line program: required flags, then absl's app with config paths resolved."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import app, flags

from ddsm_jax.configs import resolve_config_args


def run_program(main: Callable[[list[str]], None], *, required: Sequence[str] = ()) -> None:
    """`app.run(main)` after marking `required` flags, with `--config=configs/NAME.py` found in
    the package when the path does not exist (see `ddsm_jax.configs`)."""
    if required:
        flags.mark_flags_as_required(list(required))
    app.run(main, argv=resolve_config_args(sys.argv))
