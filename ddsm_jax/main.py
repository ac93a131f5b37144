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
    import contextlib

    import jax

    from ddsm_jax.layout import Workdir
    from ddsm_jax.models.network import strategy_name
    from ddsm_jax.provenance import weights_id
    from ddsm_jax.training.train import load_trained, record_config, require_checkpoint, train
    from ddsm_jax.utils.files import check_storage
    from ddsm_jax.utils.lock import WorkdirLock

    check_storage(workdir)  # a gs:// workdir that cannot be reached fails here, in seconds
    is_main = jax.process_index() == 0
    layout = Workdir(workdir)
    trains = mode in ("train", "all")
    # Every input is checked before the workdir is created or touched.
    dataset = check_inputs(config, mode)
    if not trains and not layout.root.exists():
        require_checkpoint(layout.root)  # fails; in a workdir that exists, after the lock
    # Process 0 holds the workdir for the whole run; the other hosts of a pod follow it.
    with WorkdirLock(layout.root) if is_main else contextlib.nullcontext():
        if strategy_name(config) == "step_adaptive":
            from ddsm_jax.strategies import step_adaptive

            if trains:
                result, config = step_adaptive.train_groups(config, layout.root, dataset)
            else:
                config = step_adaptive.resolve(config, layout.root)
                result = load_trained(config, layout.root)
        else:
            result = (train(config, layout.root, dataset) if trains
                      else load_trained(config, layout.root))
        # Sampling, search, evaluation and export run on process 0 over its local devices.
        if result.preempted or not is_main:
            return
        if not trains:
            record_config(layout, config)
        weights = weights_id(int(result.state.step), result.state.ema_params)
        for stage in stages_of(mode, result.network):
            report = run_stage(stage, config, layout, result, weights)
            print(json.dumps({"stage": stage, "step": int(result.state.step), **report}), flush=True)


def stages_of(mode: str, network) -> tuple[str, ...]:
    """The mode's stages; without search where the network has one width (the multi-stage and
    step-adaptive strategies: each step runs its stage's model, a rule with nothing to search)."""
    if len(network.widths) == 1:
        return tuple(stage for stage in STAGES[mode] if stage != "search")
    return STAGES[mode]


def check_inputs(config, mode: str):
    """Fails, creating nothing, on a config or input file the run could not use; returns the
    training data set where the mode trains (loading it is the check)."""
    from ddsm_jax.data.pipeline import load_dataset
    from ddsm_jax.models.network import check_widths, strategy_name
    from ddsm_jax.width_schedule import load_schedule

    check_widths(config.model.widths)
    strategy = strategy_name(config)
    if strategy == "mixed":
        raise ValueError("config.strategy=mixed is a schedule over trained workdirs' networks: "
                         "make it with python -m ddsm_jax.mix --workdirs=A,B (see docs/strategies.md)")
    searchable = strategy in ("ddsm", "adadiff", "continuous_unet") or (
        strategy == "multistage" and len(config.multistage.decoder_widths) > 1)
    if mode == "search" and not searchable:
        raise ValueError(f"the {strategy} strategy has no schedule to search: each step runs the "
                         f"model of its timestep's stage; run --mode=evaluate or --mode=all"
                         + (" (or give multistage.decoder_widths: slimmable decoders)"
                            if strategy == "multistage" else ""))
    if searchable and "search" in STAGES[mode]:
        from ddsm_jax.search.search import check_settings

        check_settings(config)
        if config.search.get("timesteps", "fixed") == "searched":
            from ddsm_jax.models.network import abstract_network
            from ddsm_jax.search.scorer import check_timesteps_searchable

            check_timesteps_searchable(abstract_network(config)[0],
                                       config.diffusion.num_timesteps)
    distillation = config.training.get("distillation", 0.0)
    if not 0.0 <= distillation <= 1.0:
        raise ValueError(f"config.training.distillation={distillation} must lie in [0, 1]: the "
                         f"weight of the full width's prediction in the narrower widths' target")
    global_middles = config.training.get("global_middles", 0.0)
    if not 0.0 <= global_middles <= 1.0:
        raise ValueError(f"config.training.global_middles={global_middles} must lie in [0, 1]: "
                         f"the share of sandwich middles that are global widths")
    if distillation and strategy not in ("ddsm", "continuous_unet"):
        raise ValueError(f"config.training.distillation applies to sandwich training (ddsm, "
                         f"continuous_unet), not to {strategy}; leave it at 0")
    if strategy == "step_adaptive":
        from ddsm_jax.strategies.step_adaptive import check_config

        check_config(config)
    if config.eval.schedule and {"evaluate", "export"} & set(STAGES[mode]):
        load_schedule(config.eval.schedule)
    return load_dataset(config.data) if mode in ("train", "all") else None


def run_stage(stage: str, config, layout, result, weights: dict) -> dict:
    """One stage on the trained EMA weights (`weights`: their `weights_id`); returns what the user
    should see of it."""
    params = result.state.ema_params
    if stage == "grids":
        from ddsm_jax.grids import WidthGrids

        paths, _ = WidthGrids(config, result.network, result.diffusion).draw(
            params, layout.samples)
        return {"samples": [str(p) for p in paths]}
    if stage == "search":
        from ddsm_jax.search.search import EvolutionarySearch

        schedule = EvolutionarySearch(config, layout.root, result.network, result.diffusion,
                                      params, weights=weights).run()
        return {"schedule": str(layout.schedule),
                **{k: schedule.figures[k] for k in ("fd", "full_fd", "macs_ratio",
                                                    "seconds_ratio", "measured_seconds_ratio",
                                                    "network_evaluations",
                                                    "naive_network_evaluations")
                   if k in schedule.figures}}
    from ddsm_jax.models.network import strategy_name
    from ddsm_jax.provenance import check_made_from
    from ddsm_jax.sampling import ScheduleSampler
    from ddsm_jax.width_schedule import find_schedule

    sampler = ScheduleSampler(result.network, result.diffusion, config.sampling)
    schedule = find_schedule(config.eval.schedule, layout.root, widths=result.network.widths,
                             sampler=sampler.method, timesteps=sampler.timesteps)
    search_again = "run --mode=search (or --mode=all) again for these weights"
    if schedule is not None and not config.eval.schedule:  # the workdir's own search
        check_made_from(layout.schedule, schedule.figures.get("weights"), weights, search_again)
    if stage == "evaluate":
        from ddsm_jax.eval.evaluate import evaluate

        baseline = None
        if strategy_name(config) == "step_adaptive":  # its base: the plain U-Net it pruned
            from ddsm_jax.strategies.step_adaptive import load_base

            base = load_base(config, layout.root)
            baseline = (base.network, base.state.ema_params)
        metrics = evaluate(config, layout.root, result.network, result.diffusion, params,
                           schedule=schedule, weights=weights, baseline=baseline)
        return {"metrics": str(layout.eval_metrics),
                **{k: metrics[k] for k in ("full", "uniform", "schedule", "fewer_steps", "noise")
                   if k in metrics}}
    from ddsm_jax.export import export_run
    from ddsm_jax.utils.files import read_json

    validated = []
    if layout.pareto.exists():
        pareto = read_json(layout.pareto)
        check_made_from(layout.pareto, pareto.get("weights"), weights, search_again)
        validated = pareto.get("validated", [])
    path = export_run(config, layout.export, result.network, result.diffusion, params,
                      schedule, validated=validated, step=int(result.state.step), weights=weights)
    return {"export": str(path)}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ddsm_jax.utils.compilation_cache import enable_compilation_cache
    from ddsm_jax.utils.distributed import initialize_distributed
    from ddsm_jax.utils.errors import quiet_background_failures

    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    enable_compilation_cache()
    logging.set_verbosity(logging.WARNING)
    quiet_background_failures()
    try:
        run(_CONFIG.value, _WORKDIR.value, _MODE.value)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted; every file written so far is complete: rerun the same command to "
              "go on from the last checkpoint or search generation", file=sys.stderr)
        sys.exit(130)


def cli() -> None:
    """The `ddsm-jax` console script."""
    run_program(main, required=["config", "workdir"])


if __name__ == "__main__":
    cli()
