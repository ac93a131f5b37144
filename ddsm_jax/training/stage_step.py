"""One multi-stage update (arXiv 2312.09181): a batch from one timestep stage trains the shared
encoder and that stage's decoder; for Step-Adaptive Training (arXiv 2312.13307), that timestep
group's own model.

The stage is drawn on the host as the paper draws it (one uniform timestep, whose stage the whole
batch then samples within), from an RNG keyed by (seed, step), and is a static argument: one
compiled step per stage, and every host and every resumed run agree. The other decoders, their
optimizer states and their EMA stay bitwise as they were: one Adam state over the whole tree
would still move them with zero gradients, through its momentum.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding

from ddsm_jax.diffusion.losses import epsilon_loss
from ddsm_jax.diffusion.schedules import Diffusion
from ddsm_jax.models.network import Network
from ddsm_jax.strategies.stage_split import stage_of, stage_ranges
from ddsm_jax.training.sandwich import every_sandwich, sandwich_of
from ddsm_jax.training.train_step import (
    TrainState,
    accumulate_gradients,
    ema_update,
    jit_train_step,
    learning_rate_schedule,
    make_optimizer,
)


def draw_stage(boundaries: Sequence[int], num_timesteps: int, seed: int, step: int) -> int:
    """The stage that step `step` trains: that of one uniformly drawn timestep."""
    return draw_choice(boundaries, num_timesteps, (1.0,), seed, step)[0]


def draw_choice(boundaries: Sequence[int], num_timesteps: int, widths: Sequence[float],
                seed: int, step: int) -> tuple[int, tuple[float, ...]]:
    """What step `step` trains: (its stage, as `draw_stage`; the widths its decoder trains at).
    With several decoder widths, a sandwich (largest, smallest, one middle drawn after the
    stage from the same generator, so the two draws are independent)."""
    rng = np.random.default_rng([seed, step])
    stage = int(stage_of(rng.integers(num_timesteps), boundaries))
    return stage, sandwich_of(widths, rng)


def choices_between(boundaries: Sequence[int], num_timesteps: int, widths: Sequence[float],
                    seed: int, start: int, stop: int) -> list[tuple[int, tuple[float, ...]]]:
    """The distinct choices steps [start, stop) train, in order of first use (the programs a run
    compiles), looking no further than the steps it takes to meet them all."""
    possible = (len(boundaries) + 1) * len(every_sandwich(widths))
    seen: dict[tuple[int, tuple[float, ...]], None] = {}
    for step in range(start, stop):
        seen.setdefault(draw_choice(boundaries, num_timesteps, widths, seed, step), None)
        if len(seen) == possible:
            break
    return list(seen)


def _stage_part(tree: dict, stage: int) -> dict:
    """What a batch of `stage` trains, of a params-shaped tree: the multi-stage U-Net's encoder
    and that stage's decoder, or that timestep group's whole model."""
    if "groups" in tree:
        return {"group": tree["groups"][stage]}
    return {"encoder": tree["encoder"], "decoder": tree["decoders"][stage]}


def _with_stage(tree: dict, stage: int, part: dict) -> dict:
    """`tree` with the `_stage_part` of `stage` replaced by `part`."""
    if "groups" in tree:
        return {"groups": {**tree["groups"], stage: part["group"]}}
    return {"encoder": part["encoder"], "decoders": {**tree["decoders"], stage: part["decoder"]}}


def make_stage_train_step(network: Network, diffusion: Diffusion,
                          training: ml_collections.ConfigDict, boundaries: Sequence[int], *,
                          state_sharding: Any = None,
                          batch_sharding: NamedSharding | None = None) -> Callable:
    """Returns `step(state, batch, rng, choice) -> (state, metrics)`, jitted, state donated; as
    `train_step.make_train_step`, with `choice` = (stage, decoder widths) static in place of the
    sandwich's widths: the batch trains the stage's decoder at each width (each with its own t,
    noise and dropout; one width, the papers' method, unless the decoders are slimmable).

    Gradients are clipped by their global norm over the encoder and the decoder together; each
    of the two (or the group's one model) then takes its own step of the usual optimizer (whose
    own clipping, per part, then changes nothing) with its own count, so a decoder's warm-up
    runs over its own updates.
    """
    optimizer = make_optimizer(training)
    clip = optax.clip_by_global_norm(training.grad_clip)
    lr_schedule = learning_rate_schedule(training)
    ranges = stage_ranges(boundaries, diffusion.num_timesteps)
    decay = training.ema_decay
    microbatch_size = training.get("microbatch_size", 0)

    def step(state: TrainState, batch: jax.Array, rng: jax.Array,
             choice: tuple[int, tuple[float, ...]]) -> tuple[TrainState, dict[str, jax.Array]]:
        chex.assert_rank(batch, 4)
        stage, widths = choice
        key = jax.random.fold_in(rng, state.step)
        trainable = _stage_part(state.params, stage)

        def loss(part: dict, images: jax.Array, images_key: jax.Array) -> tuple[jax.Array, Any]:
            params = _with_stage(state.params, stage, part)
            keys = ([images_key] if len(widths) == 1
                    else list(jax.random.split(images_key, len(widths))))
            values = []
            for width, width_key in zip(widths, keys):
                loss_key, dropout_key = jax.random.split(width_key)
                eps_fn = functools.partial(network.apply, params, width=width, stage=stage,
                                           dropout_rng=dropout_key)
                values.append(epsilon_loss(eps_fn, diffusion, images, loss_key,
                                           t_range=ranges[stage]))
            values = jnp.stack(values)
            return values.sum(), values

        def gradients(images: jax.Array, images_key: jax.Array) -> Any:
            return jax.value_and_grad(loss, has_aux=True)(trainable, images, images_key)

        (loss_value, per_stage), grads = accumulate_gradients(gradients, batch, key,
                                                              microbatch_size)
        clipped, _ = clip.update(grads, clip.init(grads))
        opt_part = _stage_part(state.opt_state, stage)
        updated, new_opt = {}, {}
        for name in trainable:
            updates, new_opt[name] = optimizer.update(clipped[name], opt_part[name],
                                                      trainable[name])
            updated[name] = optax.apply_updates(trainable[name], updates)
        ema = ema_update(_stage_part(state.ema_params, stage), updated, decay)
        new_state = TrainState(step=state.step + 1,
                               params=_with_stage(state.params, stage, updated),
                               ema_params=_with_stage(state.ema_params, stage, ema),
                               opt_state=_with_stage(state.opt_state, stage, new_opt))
        metrics = {"loss": loss_value, "loss_per_width": per_stage,
                   "grad_norm": optax.tree.norm(grads), "learning_rate": lr_schedule(state.step)}
        return new_state, metrics

    return jit_train_step(step, "choice", training, state_sharding, batch_sharding)
