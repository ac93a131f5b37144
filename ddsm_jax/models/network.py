"""Pure-function view of the slimmable U-Net: parameters are a plain nested dict of arrays.

Training, EMA, checkpoints and export all handle that dict; `apply` rebuilds the NNX module
inside the traced function, so the module objects never cross a jit boundary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from ddsm_jax.common_types import Params
from ddsm_jax.models.continuous_unet import build_continuous_unet
from ddsm_jax.models.early_exit_unet import build_early_exit_unet
from ddsm_jax.models.grouped_unet import build_grouped_unet
from ddsm_jax.models.multi_decoder import build_multi_decoder_unet
from ddsm_jax.models.stage_widths import Width, global_indices, neighbour_triples
from ddsm_jax.models.unet import build_unet
from ddsm_jax.strategies.stage_split import stage_of, stage_ranges


@dataclasses.dataclass(frozen=True)
class Network:
    """The static part of the model: its graph, image shape and the widths it was trained for.

    `boundaries` is None for one slimmable U-Net that serves every step (DDSM); for the
    multi-stage strategy's U-Net and Step-Adaptive Training's group models, the first timestep
    of stages (groups) 2..K: a sampling step at timestep t runs the decoder (model) of t's
    stage. A branch (one static program) is then a pair (stage, width index); a schedule still
    chooses only the width of each step.
    """

    graphdef: Any
    widths: tuple[Width, ...]  # with `model.stage_widths`, (encoder, middle, decoder) triples too
    image_shape: tuple[int, int, int]
    boundaries: tuple[int, ...] | None = None
    branch_arg: str = "width"  # what `widths` are: AdaDiff's are exit depths

    def apply(self, params: Params, x: jax.Array, t: jax.Array, *,
              dropout_rng: jax.Array | None = None, **branch: Any) -> jax.Array:
        """Epsilon from the branch `branch` names (its width, stage or depth)."""
        return nnx.merge(self.graphdef, params)(x, t, dropout_rng=dropout_rng, **branch)

    @property
    def global_indices(self) -> list[int]:
        """The branches that run every layer at one width: the uniform baselines."""
        return global_indices(self.widths)

    @property
    def num_stages(self) -> int:
        return 1 if self.boundaries is None else len(self.boundaries) + 1

    def stages_of(self, timesteps: Sequence[int]) -> np.ndarray:
        """The stage of each timestep (all 0 for one network)."""
        if self.boundaries is None:
            return np.zeros(len(timesteps), np.int32)
        return stage_of(np.asarray(timesteps), self.boundaries).astype(np.int32)

    def branch(self, stage: int, width_index: int) -> tuple[tuple[str, Any], ...]:
        """The static keyword arguments of `apply` for one branch, hashable."""
        width = (self.branch_arg, self.widths[width_index])
        return (width,) if self.boundaries is None else (width, ("stage", int(stage)))

    def branch_fns(self, params: Params) -> list[Callable[[jax.Array, jax.Array], jax.Array]]:
        """Every branch's denoiser, stage-major: branch `stage * len(widths) + width_index`."""
        return [functools.partial(self.apply, params, **dict(self.branch(stage, index)))
                for stage in range(self.num_stages) for index in range(len(self.widths))]


def check_widths(widths: Any, name: str = "config.model.widths") -> None:
    """A clear error for a width list the supernet cannot be built with."""
    try:
        values = [float(w) for w in widths]
    except (TypeError, ValueError):
        raise ValueError(f"{name}={widths!r} must be a list of numbers in (0, 1], "
                         f"e.g. '(1.0,0.75,0.5,0.25)'") from None
    if not values or not all(0 < w <= 1 for w in values) or len(set(values)) != len(values):
        raise ValueError(f"{name}={tuple(widths)!r} must be distinct numbers in "
                         f"(0, 1], at least one, e.g. '(1.0,0.75,0.5,0.25)'")


def strategy_name(config: ml_collections.ConfigDict) -> str:
    """`config.strategy`; configs written before strategies existed are DDSM's."""
    name = config.get("strategy", "ddsm")
    if name not in STRATEGIES:
        raise ValueError(f"config.strategy={name!r}: choose one of {list(STRATEGIES)}")
    return name


STRATEGIES = ("ddsm", "multistage", "step_adaptive", "adadiff", "continuous_unet", "mixed")
TRAINABLE = STRATEGIES[:-1]  # a mixture is made of trained workdirs (`ddsm_jax.mix`)


# Strategies whose branches are another quantity than width: (`apply`'s argument, config field).
BRANCH_ARGS = {"adadiff": ("depth", "exit_depths"),
               "continuous_unet": ("solver_fraction", "solver_fractions")}


def native_entry(strategy: str) -> str:
    """What an evaluation's "full" entry is: the single U-Net at full width; for the multi-stage
    network each step's stage decoder, for the step-adaptive one each step's group model."""
    return {"multistage": "stages", "step_adaptive": "groups"}.get(strategy, "full")


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """The network of `config.strategy`."""
    if strategy_name(config) not in TRAINABLE:
        raise ValueError(f"config.strategy={config.strategy!r} is not trained: it mixes trained "
                         f"workdirs' networks (python -m ddsm_jax.mix); train one of {TRAINABLE}")
    builder = {"multistage": build_multi_decoder_unet, "step_adaptive": build_grouped_unet,
               "adadiff": build_early_exit_unet,
               "continuous_unet": build_continuous_unet}.get(strategy_name(config), build_unet)
    return builder(config, rngs)


def _network(config: ml_collections.ConfigDict, graphdef: Any) -> Network:
    check_widths(config.model.widths)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    strategy = strategy_name(config)
    if config.model.get("stage_widths", False):
        if strategy != "ddsm":
            raise ValueError(f"config.model.stage_widths=True (a width per U-Net stage) is DDSM's "
                             f"search space; config.strategy={strategy!r} has its own branches: "
                             f"drop --config.model.stage_widths or use --config.strategy=ddsm")
        if len(config.model.widths) < 2:
            raise ValueError("config.model.stage_widths=True mixes neighbouring widths: give "
                             "config.model.widths at least two, e.g. '(1.0,0.75,0.5,0.25)'")
        return Network(graphdef, neighbour_triples(config.model.widths), image_shape)
    if strategy == "ddsm":
        return Network(graphdef, tuple(float(w) for w in config.model.widths), image_shape)
    if strategy in BRANCH_ARGS:  # one network whose branches are not widths
        name, what = BRANCH_ARGS[strategy]
        values = config[strategy][what]
        check_widths(values, f"config.{strategy}.{what}")
        return Network(graphdef, tuple(float(v) for v in values), image_shape, branch_arg=name)
    section = config[strategy]
    boundaries = tuple(int(b) for b in section.boundaries)
    stage_ranges(boundaries, config.diffusion.num_timesteps)  # checks them
    models = section.decoder_ratios if strategy == "multistage" else section.group_widths
    if len(boundaries) + 1 != len(models):
        what = "decoder_ratios" if strategy == "multistage" else "group_widths"
        raise ValueError(f"{strategy}.boundaries={boundaries} make {len(boundaries) + 1} stages "
                         f"but {strategy}.{what} gives {len(models)}; give one per stage")
    # Each stage's decoder (group's model) trains at its one width, as the papers do; or, with
    # multistage.decoder_widths, slimmable decoders whose width per step the search chooses.
    widths = section.get("decoder_widths", ()) if strategy == "multistage" else ()
    check_widths(widths or (1.0,), "config.multistage.decoder_widths")
    return Network(graphdef, tuple(float(w) for w in widths) or (1.0,), image_shape, boundaries)


def init_network(config: ml_collections.ConfigDict, key: jax.Array) -> tuple[Network, Params]:
    """Initialises the supernet's parameters under jit (much faster than eager NNX init)."""
    abstract = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)

    @jax.jit
    def init(key: jax.Array) -> Params:
        return nnx.to_pure_dict(nnx.state(build_model(config, nnx.Rngs(params=key)), nnx.Param))

    return _network(config, graphdef), init(key)


def abstract_network(config: ml_collections.ConfigDict) -> tuple[Network, Params]:
    """Shapes only: for parameter counts, cost models and ahead-of-time compilation."""
    abstract = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return _network(config, graphdef), nnx.to_pure_dict(state)


def param_count(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
