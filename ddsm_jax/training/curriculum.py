"""What each training step of a strategy trains, and what the whole run costs in MACs."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import ml_collections

from ddsm_jax.common_types import Params
from ddsm_jax.models.cost import reference_macs, width_macs
from ddsm_jax.models.network import Network, strategy_name
from ddsm_jax.models.stage_widths import width_label
from ddsm_jax.training.sandwich import every_sandwich, sandwich_widths, sandwiches_between
from ddsm_jax.training.stage_step import choices_between, draw_choice, make_stage_train_step
from ddsm_jax.training.train_step import make_train_step

# A training step's backward pass costs about twice its forward pass: a step counts 3 forwards.
FORWARD_AND_BACKWARD = 3


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """What each training step trains, as the static argument of its compiled program: DDSM's
    sandwich of widths, or a stage and the widths its decoder (group model) trains at."""

    make_step: Callable
    choice: Callable[[int], Any]  # step -> static argument
    choices_between: Callable[[int, int], list]  # the distinct ones, in order of first use
    loss_names: Callable[[Any], list[str]]  # of the per-branch losses a step reports
    branches: Callable[[Any], list[tuple]]  # the network branches a step runs, as `Network.branch`
    every_choice: list  # every static argument a run may meet: its programs
    unit: str

    @classmethod
    def of(cls, config: ml_collections.ConfigDict, network: Network) -> Curriculum:
        seed = config.seed
        widths = network.widths
        if network.boundaries is not None:
            bounds, steps = network.boundaries, config.diffusion.num_timesteps

            def loss_names(choice: tuple[int, tuple[float, ...]]) -> list[str]:
                stage, trained = choice
                if len(trained) == 1:
                    return [f"loss_stage{stage}"]
                return [f"loss_stage{stage}_w{w}" for w in trained]

            return cls(functools.partial(make_stage_train_step, boundaries=bounds),
                       lambda step: draw_choice(bounds, steps, widths, seed, step),
                       lambda start, stop: choices_between(bounds, steps, widths, seed, start,
                                                           stop),
                       loss_names,
                       lambda choice: [network.branch(choice[0], widths.index(w))
                                       for w in choice[1]],
                       [(stage, trained) for stage in range(network.num_stages)
                        for trained in every_sandwich(widths)], "stage")
        if strategy_name(config) == "adadiff":  # every exit trains at every step
            from ddsm_jax.strategies.adadiff import loss_of

            return cls(functools.partial(make_train_step, loss=loss_of(config)),
                       lambda step: widths, lambda start, stop: [widths],
                       lambda chosen: [f"loss_d{d}" for d in chosen],
                       lambda chosen: [(("all_exits", True),)], [widths], "exit set")
        share = config.training.get("global_middles", 0.0)
        return cls(make_train_step, lambda step: sandwich_widths(widths, seed, step, share),
                   lambda start, stop: sandwiches_between(widths, seed, start, stop, share),
                   lambda chosen: [f"loss_w{width_label(w)}" for w in chosen],
                   lambda chosen: [network.branch(0, widths.index(w)) for w in chosen],
                   every_sandwich(widths), "sandwich")


def training_macs(config: ml_collections.ConfigDict, network: Network,
                  params: Params) -> dict[str, float]:
    """The MACs `config.training` spends (each image of each step through every branch the step
    trains, forward and backward), counted step by step from the curriculum: what strategies
    differ in as much as in sampling cost (DDSM's sandwich trains three sub-networks per image);
    Step-Adaptive Training's includes its base model's run."""
    curriculum = Curriculum.of(config, network)
    per_choice: dict[Any, float] = {}
    total = 0.0
    for step in range(config.training.num_steps):
        choice = curriculum.choice(step)
        if choice not in per_choice:
            per_choice[choice] = sum(width_macs(network, params, **dict(branch)).total
                                     for branch in curriculum.branches(choice))
        total += per_choice[choice]
    batch = config.training.batch_size
    images, macs = config.training.num_steps * batch, FORWARD_AND_BACKWARD * batch * total
    if strategy_name(config) == "step_adaptive":  # its base model's run
        base_steps = config.step_adaptive.base_steps
        images += base_steps * batch
        macs += FORWARD_AND_BACKWARD * base_steps * batch * reference_macs(config)
    return {"images": images, "macs": macs}
