"""Sampling seconds of every strategy side by side, in one process, in alternating rounds.

    python -m benchmarks.strategies --workdirs=workdirs/digits,workdirs/digits_adadiff,...

Reads each workdir's export (`--mode=export`), times its full compute (`full`) and, where it
has one, its searched schedule (`schedule`) on the same batch of noise; every row is compiled
and warmed up first, then the rounds take each row once in turn (`--rounds`; the median is
reported), so that a noisy shared machine slows all rows alike. AdaDiff's exits where certain
are timed too (`threshold T`, per-batch exits). `time/U-Net` is against the first workdir's
full row, a plain U-Net or DDSM's full width: the evaluations in `eval/metrics.json` time each
workdir in its own run, which these machines make too noisy to compare across workdirs.
"""

from __future__ import annotations

import statistics
import time

import jax
from absl import app, flags, logging

from benchmarks.common import report
from ddsm_jax import export
from ddsm_jax.models.cost import SchedulePrices
from ddsm_jax.models.network import strategy_name
from ddsm_jax.sampling import initial_noise

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Exported workdirs; the first is the 1.0 of "
                              "the time ratios (a plain U-Net or DDSM's).")
_BATCH = flags.DEFINE_integer("batch", 100, "Images per sampling call.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds; each runs every row once.")
_THRESHOLDS = flags.DEFINE_list("thresholds", ["0.3"], "AdaDiff's exit thresholds to time.")


def rows_of(workdir: str, noise_seed: int = 1) -> list[dict]:
    """One timed row per way of sampling this workdir's export: name, a run() and its MACs."""
    model = export.load(f"{workdir}/export")
    sampler, params, config = model.sampler, model.params, model.config
    prices = SchedulePrices.of(model.network, params, sampler.timesteps, config)
    noise = initial_noise(jax.random.key(noise_seed), _BATCH.value, model.network.image_shape)
    key = jax.random.key(2)
    schedules = {"full": sampler.uniform(0)}
    if model.schedule is not None:
        schedules["schedule"] = sampler.to_indices(model.schedule)
    rows = [{"workdir": workdir, "strategy": strategy_name(config), "entry": name,
             "macs_ratio": prices(indices)["macs_ratio"],
             "run": lambda indices=indices: sampler(params, indices, noise, key)}
            for name, indices in schedules.items()]
    if strategy_name(config) == "adadiff":
        from ddsm_jax.strategies.adadiff import ExitSampler

        exits = ExitSampler(model.network, model.diffusion, config.sampling, per_batch=True)
        for tau in _THRESHOLDS.value:
            rows.append({"workdir": workdir, "strategy": "adadiff", "entry": f"threshold {tau}",
                         "macs_ratio": None,
                         "run": lambda tau=float(tau): exits(params, tau, noise, key)})
    return rows


def main(argv: list[str]) -> None:
    del argv
    if not _WORKDIRS.value:
        raise app.UsageError("give --workdirs: exported workdirs to time")
    logging.set_verbosity(logging.WARNING)  # orbax reports every restore at INFO
    rows = [row for workdir in _WORKDIRS.value for row in rows_of(workdir)]
    for row in rows:  # compile and warm up outside the timing
        jax.block_until_ready(row["run"]())
    times: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    for _ in range(_ROUNDS.value):
        for i, row in enumerate(rows):
            start = time.perf_counter()
            jax.block_until_ready(row["run"]())
            times[i].append(time.perf_counter() - start)
    reference = statistics.median(times[0])
    table = []
    for i, row in enumerate(rows):
        seconds = statistics.median(times[i])
        table.append({"workdir": row["workdir"].rstrip("/").split("/")[-1],
                      "strategy": row["strategy"], "entry": row["entry"],
                      "macs_ratio": row["macs_ratio"], "seconds": seconds,
                      "time_ratio": seconds / reference})
    report(table, [("workdir", "workdir", "s"), ("strategy", "strategy", "s"),
                   ("entry", "entry", "s"), ("macs_ratio", "MACs/U-Net", ".3f"),
                   ("seconds", "seconds", ".3f"), ("time_ratio", "time/U-Net", ".2f")],
           notes=[f"batch {_BATCH.value}, median of {_ROUNDS.value} alternating rounds"])


if __name__ == "__main__":
    flags.mark_flag_as_required("workdirs")
    app.run(main)
