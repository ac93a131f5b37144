"""Channel spaces of the slimmable U-Net, and reorderings of them that keep its function: the
structural pruning of Step-Adaptive Training (arXiv 2312.13307) on our slimmable layers.

A slimmable layer at width w keeps its *leading* channels, so pruning a network to width w is
reordering its channels by importance and taking the leading slice. Channels are coupled across
parameters: a convolution's output channels are the next layers' input channels, a GroupNorm's
and a bias's entries, and through identity shortcuts the channels of the block's input; the
decoder's blocks read the concatenation of their input and an encoder skip. A *space* is one
such set of coupled channels: every (parameter, axis, offset) that indexes it. Permuting a space
on all its entries leaves the network's function unchanged wherever no channel changes GroupNorm
group (with one group per norm, always: tested); `order_by_importance` moves whole groups.

Importance is Taylor's |w * dL/dw| (Molchanov et al.; Diff-Pruning's criterion), summed over
every parameter entry of a channel, with the loss on one group's timesteps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

Path = tuple[Any, ...]


@dataclasses.dataclass
class Space:
    """`size` coupled channels, at `[offset, offset + size)` of each (path, axis, offset)."""

    name: str
    size: int
    entries: list[tuple[Path, int, int]] = dataclasses.field(default_factory=list)


def _get(tree: Any, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Any, path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def unet_spaces(params: dict) -> list[Space]:
    """Every channel space of a `SlimmableUNet`'s parameters (`nnx.to_pure_dict` layout)."""
    spaces: list[Space] = []

    def new(name: str, size: int) -> Space:
        spaces.append(Space(name, size))
        return spaces[-1]

    def produced_by(space: Space, layer: Path) -> None:  # a conv's or a linear's outputs
        space.entries += [((*layer, "kernel"), -1, 0), ((*layer, "bias"), 0, 0)]

    def read_by(space: Space, layer: Path, offset: int = 0) -> None:  # their inputs
        space.entries.append(((*layer, "kernel"), -2, offset))

    def normalised_by(space: Space, norm: Path, offset: int = 0) -> None:
        space.entries += [((*norm, "scale"), 0, offset), ((*norm, "bias"), 0, offset)]

    temb = new("time embedding", params["temb_dense0"]["bias"].shape[0])
    produced_by(temb, ("temb_dense0",))
    read_by(temb, ("temb_dense1",))
    produced_by(temb, ("temb_dense1",))

    def res_block(path: Path, inputs: list[Space]) -> Space:
        block = _get(params, path)
        offset = 0
        for space in inputs:  # the decoder's blocks read [h, skip]
            normalised_by(space, (*path, "norm1"), offset)
            read_by(space, (*path, "conv1"), offset)
            if "shortcut" in block:
                read_by(space, (*path, "shortcut"), offset)
            offset += space.size
        read_by(temb, (*path, "temb_proj"))
        inner = new(f"{path} inner", block["conv1"]["bias"].shape[0])
        produced_by(inner, (*path, "conv1"))
        produced_by(inner, (*path, "temb_proj"))
        normalised_by(inner, (*path, "norm2"))
        read_by(inner, (*path, "conv2"))
        if "shortcut" in block:
            out = new(f"{path} out", block["conv2"]["bias"].shape[0])
            produced_by(out, (*path, "shortcut"))
        else:  # identity shortcut: the output adds to the input, channel by channel
            (out,) = inputs
        produced_by(out, (*path, "conv2"))
        if "attn" in block:
            attn = (*path, "attn")
            normalised_by(out, (*attn, "norm"))
            query_key = new(f"{path} query/key", block["attn"]["q"]["bias"].shape[0])
            value = new(f"{path} value", block["attn"]["v"]["bias"].shape[0])
            for layer in ("q", "k", "v"):
                read_by(out, (*attn, layer))
            produced_by(query_key, (*attn, "q"))
            produced_by(query_key, (*attn, "k"))
            produced_by(value, (*attn, "v"))
            read_by(value, (*attn, "proj"))
            produced_by(out, (*attn, "proj"))
        return out

    def resampled(path: Path, current: Space) -> Space:  # a Downsample's or Upsample's conv
        read_by(current, (*path, "conv"))
        out = new(f"{path}", _get(params, path)["conv"]["bias"].shape[0])
        produced_by(out, (*path, "conv"))
        return out

    current = new("head", params["head"]["bias"].shape[0])
    produced_by(current, ("head",))
    skips = [current]
    for index in sorted(params["down"]):
        path = ("down", index)
        current = (resampled(path, current) if "conv" in params["down"][index]
                   else res_block(path, [current]))
        skips.append(current)
    for index in sorted(params["mid"]):
        current = res_block(("mid", index), [current])
    for index in sorted(params["up"]):
        path = ("up", index)
        current = (resampled(path, current) if "conv" in params["up"][index]
                   else res_block(path, [current, skips.pop()]))
    normalised_by(current, ("tail_norm",))
    read_by(current, ("tail_conv",))
    return spaces


def _index(length: int, offset: int, order: np.ndarray) -> np.ndarray:
    index = np.arange(length)
    index[offset:offset + len(order)] = offset + order
    return index


def permute(params: dict, spaces: list[Space], orders: list[np.ndarray]) -> dict:
    """`params` with the channels of each space in `orders[i]` order (new channel j is old
    channel `orders[i][j]`), on every entry of the space; a new tree, `params` untouched."""
    out = _copy(params)
    for space, order in zip(spaces, orders):
        order = np.asarray(order)
        if sorted(order.tolist()) != list(range(space.size)):
            raise ValueError(f"an order of space {space.name} must permute its {space.size} channels")
        for path, axis, offset in space.entries:
            value = np.asarray(_get(out, path))
            _set(out, path, np.take(value, _index(value.shape[axis], offset, order), axis=axis))
    return out


def importance(params: dict, grads: dict, spaces: list[Space]) -> list[np.ndarray]:
    """Per space, each channel's summed |w * dL/dw| over every parameter entry that touches it."""
    scores = []
    for space in spaces:
        total = np.zeros(space.size)
        for path, axis, offset in space.entries:
            taylor = np.abs(np.asarray(_get(params, path)) * np.asarray(_get(grads, path)))
            taylor = np.moveaxis(taylor, axis, 0)[offset:offset + space.size]
            total += taylor.reshape(space.size, -1).sum(axis=1)
        scores.append(total)
    return scores


def unit_size(params: dict, space: Space, num_groups: int) -> int:
    """The channels of `space` that move together: the longest equal runs that no GroupNorm
    group boundary cuts (a whole group where a norm reads only this space; the whole space where
    one group holds it)."""
    unit = space.size
    for path, _, offset in space.entries:
        if path[-1] == "scale":  # a GroupNorm's: groups of channels / num_groups
            group = _get(params, path).shape[0] // num_groups
            for boundary in range(-offset % group or group, space.size, group):
                unit = math.gcd(unit, boundary)
    return unit


def importance_order(score: np.ndarray, unit: int) -> np.ndarray:
    """Units of `unit` channels by decreasing summed score, and channels within each unit by
    decreasing score."""
    units = np.asarray(score).reshape(-1, unit)
    unit_order = np.argsort(-units.sum(axis=1), kind="stable")
    within = np.argsort(-units, axis=1, kind="stable")[unit_order]
    return (unit_order[:, None] * unit + within).reshape(-1)


def order_by_importance(params: dict, grads: dict, num_groups: int) -> dict:
    """`params` with every space's channels in decreasing importance, so that the leading
    slice a width keeps holds its most important channels. Channels move in `unit_size` runs:
    a permutation that moves whole GroupNorm groups, and channels only within their group,
    keeps the network's function exactly (where a norm's groups straddle two spaces, runs are
    shorter and the function changes a little)."""
    spaces = unet_spaces(params)
    orders = [importance_order(score, unit_size(params, space, num_groups))
              for space, score in zip(spaces, importance(params, grads, spaces))]
    return permute(params, spaces, orders)


def _copy(tree: Any) -> Any:
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree
