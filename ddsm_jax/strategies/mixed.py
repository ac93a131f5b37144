"""Mixed schedules: one schedule whose steps choose among the branches of several trained
networks (say the continuous U-Net on the noisy steps and the full U-Net on the last ones).

A branch is a denoiser: where networks share their data, image shape and noise schedule, any of
their branches can take any sampling step. `MixedNetwork` shows them as one network with one
list of branches, so the search, the samplers and the evaluation run on it unchanged. Its
`widths` (the index space a schedule file records) are the branches' MACs ratios against the
full U-Net, costliest first as a width list is; `labels` say whose branch each is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from ddsm_jax.common_types import Params
from ddsm_jax.models.cost import width_macs
from ddsm_jax.models.network import Network, strategy_name

# Strategies whose network is one set of branches any step may run; the multi-stage and
# step-adaptive networks tie each step to its stage's model.
MIXABLE = ("ddsm", "adadiff", "continuous_unet")
CODE_DECIMALS = 4  # a branch's code: its MACs ratio to this many decimals


@dataclasses.dataclass(frozen=True)
class Member:
    """One trained network of a mixture: `name` is how labels call it (its workdir's name)."""

    name: str
    network: Network
    params: Params


@dataclasses.dataclass(frozen=True)
class MixedNetwork(Network):
    """Branches of several networks as one network; parameters are {"0": first member's, ...}."""

    members: tuple[Network, ...] = ()
    choices: tuple[tuple[int, float], ...] = ()  # per branch: (member index, its branch value)
    labels: tuple[str, ...] = ()

    def apply(self, params: Params, x: jax.Array, t: jax.Array, *,
              dropout_rng: jax.Array | None = None, **branch: Any) -> jax.Array:
        member, value = self.choices[self.widths.index(branch[self.branch_arg])]
        network = self.members[member]
        return network.apply(params[str(member)], x, t, dropout_rng=dropout_rng,
                             **{network.branch_arg: value})


def check_mixable(config: ml_collections.ConfigDict, member: ml_collections.ConfigDict,
                  name: str) -> None:
    """One line naming why `member` (a workdir's config) cannot share a schedule under `config`."""
    strategy = strategy_name(member)
    if strategy not in MIXABLE:
        raise ValueError(f"{name} is a {strategy} run: each of its steps runs the model of its "
                         f"stage, not a branch a schedule could choose; mix workdirs of "
                         f"{', '.join(MIXABLE)}")
    for what in ("name", "image_size", "channels"):
        if member.data[what] != config.data[what]:
            raise ValueError(f"{name} was trained with data.{what}={member.data[what]!r} but the "
                             f"config has {config.data[what]!r}: mix networks of one data set")
    if member.diffusion.to_dict() != config.diffusion.to_dict():
        raise ValueError(f"{name} was trained with other diffusion settings than the config's "
                         f"({member.diffusion.to_dict()} against {config.diffusion.to_dict()}): "
                         f"branches must share one noise schedule")


def mix(members: Sequence[Member], reference_macs: float) -> tuple[MixedNetwork, Params,
                                                                    list[str]]:
    """The mixture of `members`' branches, its parameters, and the labels of branches left out:
    where two cost the same MACs the one of the member named first is kept (a schedule file
    could not tell them apart)."""
    if len(members) < 2:
        raise ValueError("a mixture needs at least two workdirs")
    shapes = {m.network.image_shape for m in members}
    if len(shapes) > 1:
        raise ValueError(f"the workdirs' images differ in shape ({sorted(shapes)})")
    kept: dict[float, tuple[int, float, str]] = {}
    dropped = []
    for index, member in enumerate(members):
        network = member.network
        for value in network.widths:
            macs = width_macs(network, member.params, **{network.branch_arg: value}).total
            code = round(macs / reference_macs, CODE_DECIMALS)
            label = f"{member.name} {value:g}"
            if code in kept:
                dropped.append(label)
            else:
                kept[code] = (index, float(value), label)
    codes = sorted(kept, reverse=True)  # costliest first
    network = MixedNetwork(
        graphdef=None, widths=tuple(codes), image_shape=shapes.pop(), branch_arg="choice",
        members=tuple(m.network for m in members),
        choices=tuple(kept[c][:2] for c in codes), labels=tuple(kept[c][2] for c in codes))
    return network, {str(i): m.params for i, m in enumerate(members)}, dropped
