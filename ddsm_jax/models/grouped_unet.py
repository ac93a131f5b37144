"""Step-Adaptive Training's network (Li et al., arXiv 2312.13307): one U-Net per timestep group,
each pruned from the base model to its own width.

A group's model is a `SlimmableUNet` whose channels were reordered by importance, run at its
group's width: the leading slice it keeps is the pruned network, so its MACs are exactly those
of the smaller network. The checkpoint keeps the full-shape tree of every group (the channels a
group does not use stay as the base model left them and never move), which is what lets the
same slimmable layers, tracer and sampler serve it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
from flax import nnx

from ddsm_jax.models.unet import build_unet


class GroupedUNet(nnx.Module):
    """Epsilon from the U-Net of timestep group `stage` (static), at that group's width."""

    def __init__(self, config: ml_collections.ConfigDict, group_widths: Sequence[float], *,
                 rngs: nnx.Rngs):
        if not group_widths:
            raise ValueError("step_adaptive.group_widths is empty: the base phase of "
                             "--mode=train sets them")
        self.group_widths = tuple(float(w) for w in group_widths)
        self.groups = nnx.List([build_unet(config, rngs) for _ in self.group_widths])

    def __call__(self, x: jax.Array, t: jax.Array, *, stage: int, width: float = 1.0,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """`width` narrows the group's model further (1.0: its own pruned width)."""
        if not 0 <= stage < len(self.groups):
            raise ValueError(f"group {stage} of a network with {len(self.groups)} groups")
        return self.groups[stage](x, t, width=self.group_widths[stage] * width,
                                  dropout_rng=dropout_rng)


def build_grouped_unet(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> GroupedUNet:
    return GroupedUNet(config, tuple(config.step_adaptive.group_widths), rngs=rngs)
