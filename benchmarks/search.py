"""Search cost per generation: seconds and network evaluations, with and without the savings.

    python -m benchmarks.search --workdir=workdirs/digits

Runs the config's search (default: digits; validation off) four times from scratch on the
supernet trained in `--workdir` (`--mode=train` first; its domain classifier is reused):
every candidate from x_T (naive), with shared prefixes inside a generation, with shared
prefixes plus the trajectory cache (children start from their parents' kept states); these
three must choose bitwise the same populations, only the work differs. The fourth also lets the
surrogate sample only half of each generation's children (`search.surrogate_keep=0.5`), which
changes what is searched: its quality is the validated FD of a full run (README). Goals: network
evaluations per generation at least 30% below naive (issue 6), at most half the naive count over
the whole search (issue 22).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks.common import report
from ddsm_jax.layout import Workdir
from ddsm_jax.search.search import EvolutionarySearch
from ddsm_jax.training.train import load_trained
from ddsm_jax.utils.compile_counter import CompileCounter

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/digits", "A workdir with a trained supernet.")

# mode: (share_prefixes, trajectory_cache_mb (None keeps the config's), surrogate_keep)
MODES = {"naive": (False, 0, 1.0), "prefixes": (True, 0, 1.0), "prefixes+cache": (True, None, 1.0),
         "+surrogate 0.5": (True, None, 0.5)}
EXACT = ("naive", "prefixes", "prefixes+cache")  # the savings that leave the results bitwise


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    base = _CONFIG.value
    base.search.validation_samples = 0
    trained = load_trained(base, _WORKDIR.value)
    rows, populations = [], {}
    for mode, (share, cache_mb, keep) in MODES.items():
        config = copy.deepcopy(base)
        config.search.share_prefixes = share
        config.search.surrogate_keep = keep
        if cache_mb is not None:
            config.search.trajectory_cache_mb = cache_mb
        with tempfile.TemporaryDirectory() as scratch:
            classifier = Workdir(_WORKDIR.value).classifier
            if classifier.is_dir():
                shutil.copytree(classifier, Workdir(scratch).classifier)
            start = time.perf_counter()
            with CompileCounter() as compiles:
                search = EvolutionarySearch(config, scratch, trained.network, trained.diffusion,
                                            trained.state.ema_params, progress=False)
                search.run()
            total = time.perf_counter() - start
            history = [json.loads(line) for line in
                       Workdir(scratch).search_history.read_text().splitlines()]
        populations[mode] = [h["best_fitness"] for h in history]
        for h in history:
            rows.append({"mode": mode, "generation": h["generation"], "seconds": h["seconds"],
                         "network_evaluations": h["network_evaluations"],
                         "naive_evaluations": h["naive_evaluations"],
                         "saved": 1 - h["network_evaluations"] / h["naive_evaluations"]})
        later = [h for h in history if h["generation"] > 0]
        calls = sum(h["network_evaluations"] for h in later)
        naive = sum(h["naive_evaluations"] for h in later)
        rows.append({"mode": mode, "generation": "1+ mean",
                     "seconds": sum(h["seconds"] for h in later) / len(later),
                     "network_evaluations": calls / len(later),
                     "naive_evaluations": naive / len(later),
                     "saved": 1 - calls / naive, "search_seconds": total,
                     "compiles": compiles.count, "compile_seconds": compiles.seconds})
        whole = sum(h["network_evaluations"] for h in history)
        whole_naive = sum(h["naive_evaluations"] for h in history)
        rows.append({"mode": mode, "generation": "whole search", "network_evaluations": whole,
                     "naive_evaluations": whole_naive, "saved": 1 - whole / whole_naive,
                     "of_naive": whole / whole_naive})
    same = len({tuple(populations[mode]) for mode in EXACT}) == 1
    report(rows, [("mode", "mode", "s"), ("generation", "gen", ""), ("seconds", "s/gen", ".2f"),
                  ("network_evaluations", "net evals", ".1f"),
                  ("naive_evaluations", "naive", ".1f"),
                  ("saved", "saved", ".0%"), ("compile_seconds", "compile s", ".1f")],
           notes=[f"{base.search.population_size} candidates x {base.search.generations} "
                  f"generations x {base.sampling.num_steps} steps, {base.search.num_samples} "
                  f"samples each; trajectory cache {base.search.trajectory_cache_mb} MB; "
                  f"same best fitness in the exact modes ({', '.join(EXACT)}): {same}"])
    if not same:
        raise SystemExit("the exact modes chose different populations: the savings changed "
                         "the results")


if __name__ == "__main__":
    app.run(main)
