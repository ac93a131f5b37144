"""Pure-function view of the slimmable U-Net: parameters are a plain nested dict of arrays.

Training, EMA, checkpoints and export all handle that dict; `apply` rebuilds the NNX module
inside the traced function, so the module objects never cross a jit boundary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from flax import nnx

from ddsm_jax.common_types import Params
from ddsm_jax.models.multi_decoder import build_multi_decoder_unet
from ddsm_jax.models.unet import build_unet


@dataclasses.dataclass(frozen=True)
class Network:
    """The static part of the model: its graph, image shape and the widths it was trained for.

    `stages` is 0 for one slimmable U-Net (DDSM) and K for the multi-stage strategy's U-Net with
    K decoders, whose `apply` also takes the (static) `stage`.
    """

    graphdef: Any
    widths: tuple[float, ...]
    image_shape: tuple[int, int, int]
    stages: int = 0

    def apply(self, params: Params, x: jax.Array, t: jax.Array, *, width: float,
              dropout_rng: jax.Array | None = None, **branch: Any) -> jax.Array:
        return nnx.merge(self.graphdef, params)(x, t, width=width, dropout_rng=dropout_rng,
                                                 **branch)


def check_widths(widths: Any) -> None:
    """A clear error for a width list the supernet cannot be built with."""
    try:
        values = [float(w) for w in widths]
    except (TypeError, ValueError):
        raise ValueError(f"config.model.widths={widths!r} must be a list of numbers in (0, 1], "
                         f"e.g. '(1.0,0.75,0.5,0.25)'") from None
    if not values or not all(0 < w <= 1 for w in values) or len(set(values)) != len(values):
        raise ValueError(f"config.model.widths={tuple(widths)!r} must be distinct numbers in "
                         f"(0, 1], at least one, e.g. '(1.0,0.75,0.5,0.25)'")


def strategy_name(config: ml_collections.ConfigDict) -> str:
    """`config.strategy`; configs written before strategies existed are DDSM's."""
    name = config.get("strategy", "ddsm")
    if name not in STRATEGIES:
        raise ValueError(f"config.strategy={name!r}: choose one of {list(STRATEGIES)}")
    return name


STRATEGIES = ("ddsm", "multistage")


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """The network of `config.strategy`."""
    if strategy_name(config) == "multistage":
        return build_multi_decoder_unet(config, rngs)
    return build_unet(config, rngs)


def _network(config: ml_collections.ConfigDict, graphdef: Any) -> Network:
    check_widths(config.model.widths)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    stages = (len(config.multistage.decoder_ratios) if strategy_name(config) == "multistage"
              else 0)
    return Network(graphdef, tuple(float(w) for w in config.model.widths), image_shape, stages)


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
