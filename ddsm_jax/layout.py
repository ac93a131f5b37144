"""What the stages of a run share: where each file lives in the workdir, and which random stream
each stage draws from. Every stage asks this module, so both are spelled once.

    WORKDIR/
        config.json                 the resolved config of the latest run, once it fits the checkpoints
        lock                        who runs in the workdir now (host, pid, command); empty when nobody
        checkpoints/<step>/         orbax: parameters, EMA parameters, optimizer and data-iterator state,
                                    and the network's identity (model, diffusion and data settings)
        metrics.jsonl               one JSON object per logged training step
        tensorboard/                the same scalars, and the sample grids, as event files
        samples/                    width_<w>.png and widths.png (step_<k>/ during training)
        search/                     state.json, history.jsonl, schedule.json, pareto.json, *.png
        eval/                       metrics.json, a grid per entry, samples.png, reference statistics
        eval/classifier/            the digits / MNIST feature classifier, trained once
        export/                     the standalone artifact (`ddsm_jax.export`)
"""

from __future__ import annotations

import enum

import jax
from etils import epath

from ddsm_jax.common_types import PathLike
from ddsm_jax.utils.files import as_path


class Workdir:
    """The paths of one run's workdir, local or gs://."""

    def __init__(self, root: PathLike):
        self.root = as_path(root)

    def __repr__(self) -> str:
        return f"Workdir({str(self.root)!r})"

    @property
    def config(self) -> epath.Path:
        return self.root / "config.json"

    @property
    def lock(self) -> epath.Path:
        return self.root / "lock"

    @property
    def checkpoints(self) -> epath.Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> epath.Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> epath.Path:
        return self.root / "tensorboard"

    @property
    def samples(self) -> epath.Path:
        return self.root / "samples"

    def samples_at(self, step: int) -> epath.Path:
        return self.samples / f"step_{step}"

    @property
    def search(self) -> epath.Path:
        return self.root / "search"

    @property
    def search_state(self) -> epath.Path:
        return self.search / "state.json"

    @property
    def search_history(self) -> epath.Path:
        return self.search / "history.jsonl"

    @property
    def schedule(self) -> epath.Path:
        return self.search / "schedule.json"

    @property
    def pareto(self) -> epath.Path:
        return self.search / "pareto.json"

    @property
    def eval(self) -> epath.Path:
        return self.root / "eval"

    @property
    def eval_metrics(self) -> epath.Path:
        return self.eval / "metrics.json"

    @property
    def classifier(self) -> epath.Path:
        return self.eval / "classifier"

    @property
    def export(self) -> epath.Path:
        return self.root / "export"

    @property
    def base(self) -> epath.Path:
        """Step-Adaptive Training's base model: a workdir of its own inside this one."""
        return self.root / "base"

    @property
    def step_groups(self) -> epath.Path:
        """Step-Adaptive Training's groups, difficulties, widths and pruning figures."""
        return self.root / "step_groups.json"


class Stream(enum.IntEnum):
    """The random streams of a seed: stage S draws from `stream_key(seed, S)`. The network's
    initial parameters come from `jax.random.key(seed)` itself. Inside a sampling stream, 0 draws
    the initial images, 1 the per-step noise (`fold_in(., step)`), 2 the timing batch. These
    numbers are part of every result: changing one changes what a rerun draws."""

    TRAIN = 1  # timesteps, noise and dropout of training step s: fold_in(., s)
    GRIDS = 2  # the per-width sample grids
    EVALUATE = 3  # --mode=evaluate: every entry's samples, from the same noise
    EXPORT = 4  # the samples stored with an export
    SEARCH = 5  # the search's shared noise; the evolution's numpy generator is seeded [seed, 5]
    VALIDATION = 6  # the fresh noise on which the search's shortlist is scored again
    PROBE = 7  # Step-Adaptive Training's per-group losses and importances: fold_in(., group)


def stream_key(seed: int, stream: Stream) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), int(stream))
