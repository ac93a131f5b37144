"""Entry point: `python -m ddsm_jax.main --config=configs/digits.py --workdir=DIR [--mode=...]`.

Modes: `train` trains the supernet (resuming from DIR if it holds checkpoints) then draws one
sample grid per width; `sample` draws the grids from DIR's latest checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample"], "Stage to run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs outside TPU pods "
    "and SLURM (which JAX detects itself); needs --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, from 0.")


def run(config, workdir: str, mode: str) -> None:
    # Imported here so that `--help` and flag errors answer without loading JAX.
    import jax

    from ddsm_jax.grids import WidthGrids
    from ddsm_jax.training.train import load_trained, train

    is_main = jax.process_index() == 0
    workdir_path = Path(workdir)
    if is_main:
        workdir_path.mkdir(parents=True, exist_ok=True)
        (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    result = train(config, workdir_path) if mode == "train" else load_trained(config, workdir_path)
    if result.preempted or not is_main:
        return
    grids = WidthGrids(config, result.network, result.diffusion)
    paths, _ = grids.draw(result.state.ema_params, workdir_path / "samples")
    print(json.dumps({"step": int(result.state.step), "samples": [str(p) for p in paths]}))


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
    except (ValueError, FileNotFoundError, FloatingPointError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
