"""The configs: one file per data set, each a `get_config(variant)` returning a ConfigDict.

Commands name them by path, `--config=configs/digits.py:tiny` (the repository's `configs/` is a
link to this folder). Where no file exists at such a path, as for an installed `ddsm-jax` run
from another directory, `configs/NAME.py` means this package's config NAME.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent
_PREFIX = "configs/"


def resolve_config_path(value: str) -> str:
    """`configs/NAME.py[:VARIANT]` -> this package's file when nothing exists at that path."""
    path, colon, variant = value.partition(":")
    if path.startswith(_PREFIX) and not os.path.exists(path):
        packaged = DIRECTORY / path[len(_PREFIX):]
        if packaged.is_file():
            return f"{packaged}{colon}{variant}"
    return value


def config_value(argv: Sequence[str], flag: str = "config") -> str | None:
    """The value `argv` gives `--config` (as `--config=X` or `--config X`), or None."""
    equals, separate = f"--{flag}=", f"--{flag}"
    for i, arg in enumerate(argv):
        if arg.startswith(equals):
            return arg[len(equals):]
        if arg == separate and i + 1 < len(argv):
            return argv[i + 1]
    return None


def resolve_config_args(argv: Sequence[str], flag: str = "config") -> list[str]:
    """`argv` with the value of `--config=...` (or `--config ...`) passed through
    `resolve_config_path`."""
    argv, equals, separate = list(argv), f"--{flag}=", f"--{flag}"
    for i, arg in enumerate(argv):
        if arg.startswith(equals):
            argv[i] = equals + resolve_config_path(arg[len(equals):])
        elif arg == separate and i + 1 < len(argv):
            argv[i + 1] = resolve_config_path(argv[i + 1])
    return argv
