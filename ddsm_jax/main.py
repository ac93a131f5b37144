"""Entry point: `python -m ddsm_jax.main --config=configs/digits.py --workdir=DIR [--mode=...]`.

Modes: `train` trains the supernet (resuming from DIR if it holds checkpoints) then draws one
sample grid per width; `sample` draws the grids from DIR's latest checkpoint; `search` finds a width
per sampling step (DIR/search/); `evaluate` scores full width, every uniform width and the
schedule (DIR/eval/metrics.json); `export` writes the standalone artifact and its samples
(DIR/export/); `all` runs train, search, evaluate and export in turn.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddsm_jax.utils.cli import run_program

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "search", "evaluate", "export",
                                           "all"], "Stage to run; 'all' runs train, search, "
                          "evaluate and export in turn.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs outside TPU pods "
    "and SLURM (which JAX detects itself); needs --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, from 0.")


STAGES = {"train": ("grids",), "sample": ("grids",), "search": ("search",),
          "evaluate": ("evaluate",), "export": ("export",),
          "all": ("grids", "search", "evaluate", "export")}


def run(config, workdir: str, mode: str) -> None:
    # Imported here so that `--help` and flag errors answer without loading JAX.
    import jax

    from ddsm_jax.layout import Workdir
    from ddsm_jax.training.train import load_trained, train
    from ddsm_jax.utils.files import check_storage, write_text_atomically

    check_storage(workdir)  # a gs:// workdir that cannot be reached fails here, in seconds
    is_main = jax.process_index() == 0
    layout = Workdir(workdir)
    if is_main:
        write_text_atomically(layout.config, config.to_json_best_effort(indent=2))
    trains = mode in ("train", "all")
    result = train(config, layout.root) if trains else load_trained(config, layout.root)
    # Sampling, search, evaluation and export run on process 0 over its local devices.
    if result.preempted or not is_main:
        return
    for stage in STAGES[mode]:
        report = run_stage(stage, config, layout, result)
        print(json.dumps({"stage": stage, "step": int(result.state.step), **report}), flush=True)


def run_stage(stage: str, config, layout, result) -> dict:
    """One stage on the trained EMA weights; returns what the user should see of it."""
    params = result.state.ema_params
    if stage == "grids":
        from ddsm_jax.grids import WidthGrids

        paths, _ = WidthGrids(config, result.network, result.diffusion).draw(
            params, layout.samples)
        return {"samples": [str(p) for p in paths]}
    if stage == "search":
        from ddsm_jax.search.search import EvolutionarySearch

        schedule = EvolutionarySearch(config, layout.root, result.network, result.diffusion,
                                      params).run()
        return {"schedule": str(layout.schedule),
                **{k: schedule.figures[k] for k in ("fd", "full_fd", "macs_ratio",
                                                    "network_evaluations",
                                                    "naive_network_evaluations")}}
    from ddsm_jax.sampling import ScheduleSampler
    from ddsm_jax.width_schedule import find_schedule

    sampler = ScheduleSampler(result.network, result.diffusion, config.sampling)
    schedule = find_schedule(config.eval.schedule, layout.root, widths=result.network.widths,
                             sampler=sampler.method, timesteps=sampler.timesteps)
    if stage == "evaluate":
        from ddsm_jax.eval.evaluate import evaluate

        metrics = evaluate(config, layout.root, result.network, result.diffusion, params,
                           schedule=schedule)
        return {"metrics": str(layout.eval_metrics),
                **{k: metrics[k] for k in ("full", "uniform", "schedule", "noise")
                   if k in metrics}}
    from ddsm_jax.export import export_run
    from ddsm_jax.utils.files import read_json

    validated = read_json(layout.pareto).get("validated", []) if layout.pareto.exists() else []
    path = export_run(config, layout.export, result.network, result.diffusion, params,
                      schedule, validated=validated, step=int(result.state.step))
    return {"export": str(path)}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ddsm_jax.utils.compilation_cache import enable_compilation_cache
    from ddsm_jax.utils.distributed import initialize_distributed

    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    enable_compilation_cache()
    logging.set_verbosity(logging.WARNING)
    try:
        run(_CONFIG.value, _WORKDIR.value, _MODE.value)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def cli() -> None:
    """The `ddsm-jax` console script."""
    run_program(main, required=["config", "workdir"])


if __name__ == "__main__":
    cli()
