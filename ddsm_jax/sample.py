"""`python -m ddsm_jax.sample --export=DIR --budget=0.4 --num_samples=N --out=FILE.npz`.

Draws samples from an export with the best schedule it offers within a compute budget: the
lowest validated FD among the schedules whose mean MACs per step are at most `--budget` of full
width's (or whose measured sampling time is at most `--seconds_budget` of full width's). Writes
uint8 NHWC images under `arr_0` in FILE.npz and a grid of the first 64 beside it (FILE.png), and
prints one JSON line: the schedule's `macs_ratio`, validated `fd`, `seconds_ratio` and `widths`.
Without a budget it samples with the export's chosen schedule.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

_EXPORT = flags.DEFINE_string("export", None, "An export folder (WORKDIR/export), local or gs://.")
_BUDGET = flags.DEFINE_float("budget", None, "At most this fraction of full width's MACs per step.")
_SECONDS_BUDGET = flags.DEFINE_float(
    "seconds_budget", None, "At most this fraction of full width's sampling time, as measured "
    "when the export was made (on that machine).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "How many images to draw.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "samples.npz", "Where to write the images (.npz); the grid "
                           "goes beside it as .png.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial images and the per-step noise.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per sampler call (default: the "
                                   "export's config.sampling.batch_size).", lower_bound=1)

GRID_IMAGES = 64


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name, value in (("budget", _BUDGET.value), ("seconds_budget", _SECONDS_BUDGET.value)):
        if value is not None and value <= 0:
            raise app.UsageError(f"--{name} must be positive, got {value}")
    import numpy as np
    from absl import logging

    from ddsm_jax import export
    from ddsm_jax.utils.compilation_cache import enable_compilation_cache
    from ddsm_jax.utils.files import check_storage, write_atomically
    from ddsm_jax.utils.images import save_grid, to_uint8

    enable_compilation_cache()
    logging.set_verbosity(logging.WARNING)
    out = _OUT.value
    try:
        check_storage(_EXPORT.value)
        check_storage(out)
        model = export.load(_EXPORT.value)
        member = model.choose(budget=_BUDGET.value, seconds_budget=_SECONDS_BUDGET.value)
        images = to_uint8(model.sample(_NUM_SAMPLES.value, seed=_SEED.value,
                                       schedule=np.asarray(member.schedule, np.int32),
                                       batch_size=_BATCH_SIZE.value, progress=True))
        npz = write_atomically(out, lambda handle: np.savez(handle, arr_0=images))
        grid = save_grid(images[:GRID_IMAGES], str(npz).removesuffix(".npz") + ".png")
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"out": str(npz), "grid": str(grid), "num_samples": int(images.shape[0]),
                      "macs_ratio": member.macs_ratio, "fd": member.fd,
                      "seconds_ratio": member.seconds_ratio, "chosen": member.chosen,
                      "widths": member.widths(model.network.widths)}), flush=True)


def cli() -> None:
    """The `ddsm-jax-sample` console script."""
    from ddsm_jax.utils.cli import run_program

    run_program(main, required=["export"])


if __name__ == "__main__":
    cli()
