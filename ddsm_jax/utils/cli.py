"""Starting a command-line program: required flags, config paths resolved, and every flag mistake
(an unknown config key, a missing config file, a bad value) reported in one line, exit status 2."""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

from ddsm_jax.configs import config_value, resolve_config_args

_OVERRIDE = re.compile(r"^--?config\.([\w.]+)(?:=|$)")


def _leaf_keys(config, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        if hasattr(value, "items"):
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def unknown_config_key(config, argv: Sequence[str]) -> str | None:
    """The first `--config.KEY=...` of `argv` that `config` lacks, with the closest valid keys,
    as one sentence; None when every key exists."""
    valid = _leaf_keys(config)
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if match and match.group(1) not in valid:
            key = match.group(1)
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join('config.' + k for k in close)}?" if close else \
                "see the config file for the keys there are"
            return f"unknown config key config.{key}: {hint}"
    return None


def _parser(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS:
            # A config file that failed to load is a placeholder that raises when it is used.
            getattr(flags.FLAGS["config"].value, "keys", None)
        return rest
    except Exception as error:  # flag errors and whatever a config file or override raises
        print(f"error: {_one_line(error, argv)}", file=sys.stderr)
        sys.exit(2)


def _one_line(error: Exception, argv: list[str]) -> str:
    text = str(error)
    if "No such file or directory" in text and "config" in text:
        return (f"no config file {config_value(argv)}: give one such as configs/digits.py or "
                f"configs/digits.py:tiny")
    if "config." in text or not isinstance(error, flags.Error):
        config = _loaded_config(argv)
        unknown = unknown_config_key(config, argv) if config is not None else None
        if unknown:
            return unknown
    if "Traceback" in text:  # a config file that raised: its exception is the last line
        text = text.strip().splitlines()[-1]
    return " ".join(text.split())


def _loaded_config(argv: list[str]):
    """The config file named by --config, loaded without its overrides (None if it cannot be)."""
    import runpy

    value = config_value(argv)
    if not value:
        return None
    path, _, variant = value.partition(":")
    try:
        get_config = runpy.run_path(path)["get_config"]
        return get_config(variant) if variant else get_config()
    except Exception:
        return None


def run_program(main: Callable[[list[str]], None], *, required: Sequence[str] = ()) -> None:
    """`app.run(main)` after marking `required` flags, with `--config=configs/NAME.py` found in
    the package when the path does not exist (see `ddsm_jax.configs`)."""
    if required:
        flags.mark_flags_as_required(list(required))
    app.run(main, argv=resolve_config_args(sys.argv), flags_parser=_parser)
