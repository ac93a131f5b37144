"""One fused supernet update: the sandwich widths' losses summed, Adam, EMA."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddsm_jax.common_types import Params
from ddsm_jax.diffusion.losses import epsilon_loss, noisy_batch
from ddsm_jax.diffusion.schedules import Diffusion
from ddsm_jax.models.network import Network
from ddsm_jax.training.sharding import state_shardings

CPU_SCHEDULERS = ("memory", "concurrency")  # training.cpu_scheduler (configs/base.py)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Params
    ema_params: Params
    opt_state: optax.OptState

    @classmethod
    def create(cls, params: Params, optimizer: optax.GradientTransformation) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   ema_params=jax.tree_util.tree_map(jnp.copy, params),
                   opt_state=init_optimizer_state(optimizer, params))


def init_optimizer_state(optimizer: optax.GradientTransformation, params: Params) -> Any:
    """One optimizer state for a network's whole tree; for the multi-decoder U-Net's (encoder
    and decoders), one for the encoder and one per decoder, so that a decoder's state moves
    only when its stage trains (`stage_step`); for the grouped U-Net, one per group."""
    if set(params) == {"groups"}:
        return {"groups": {k: optimizer.init(v) for k, v in params["groups"].items()}}
    if set(params) != {"encoder", "decoders"}:
        return optimizer.init(params)
    return {"encoder": optimizer.init(params["encoder"]),
            "decoders": {k: optimizer.init(v) for k, v in params["decoders"].items()}}


def abstract_train_state(params: Params, optimizer: optax.GradientTransformation,
                         mesh: Mesh) -> tuple[TrainState, Any]:
    """Shapes of the train state with their shardings on `mesh` (nothing is allocated), and
    those shardings: what ahead-of-time compilation and sharded initialisation need."""
    abstract = jax.eval_shape(lambda p: TrainState.create(p, optimizer), params)
    shardings = state_shardings(mesh, abstract)
    with_shardings = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return with_shardings, shardings


def sharded_train_state(params: Params, optimizer: optax.GradientTransformation,
                        mesh: Mesh) -> tuple[TrainState, Any]:
    """A fresh train state placed straight into its shardings, and those shardings."""
    _, shardings = abstract_train_state(params, optimizer, mesh)
    state = jax.jit(lambda p: TrainState.create(p, optimizer), out_shardings=shardings)(params)
    return state, shardings


def ema_update(ema: Params, params: Params, decay: float) -> Params:
    """The exponential moving average of the parameters, one step on."""
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def learning_rate_schedule(training: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from zero, then constant (the DDPM recipe)."""
    return optax.linear_schedule(0.0, training.learning_rate, max(1, training.warmup_steps))


def make_optimizer(training: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(training.grad_clip),
                       optax.adam(learning_rate_schedule(training)))


def sandwich_loss(network: Network, diffusion: Diffusion, params: Params, x0: jax.Array,
                  key: jax.Array, widths: tuple[float, ...], *,
                  distillation: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Sum of the epsilon losses of `widths` on one batch, each with its own t, noise, dropout;
    with `distillation` > 0, in-place distillation instead (`distilled_sandwich_loss`)."""
    if distillation:
        return distilled_sandwich_loss(network, diffusion, params, x0, key, widths,
                                       distillation)
    losses = []
    for index, width in enumerate(widths):
        loss_key, dropout_key = jax.random.split(jax.random.fold_in(key, index))

        def eps_fn(x_t: jax.Array, t: jax.Array, width: float = width,
                   dropout_key: jax.Array = dropout_key) -> jax.Array:
            return network.apply(params, x_t, t, dropout_rng=dropout_key,
                                 **{network.branch_arg: width})

        losses.append(epsilon_loss(eps_fn, diffusion, x0, loss_key))
    per_width = jnp.stack(losses)
    return per_width.sum(), per_width


def distilled_sandwich_loss(network: Network, diffusion: Diffusion, params: Params,
                            x0: jax.Array, key: jax.Array, widths: tuple[float, ...],
                            distillation: float) -> tuple[jax.Array, jax.Array]:
    """In-place distillation (BigNAS, OFA): every width sees the same noisy batch; the first
    (largest) learns the noise, the others a target moved by `distillation` from the noise to
    the largest's stop-gradient prediction, the teacher that is already in the step.

    (1 - d) |e - noise|^2 + d |e - teacher|^2 equals |e - ((1 - d) noise + d teacher)|^2 up to a
    constant, so one MSE against the mixed target gives the same gradients."""
    x_t, t, noise = noisy_batch(diffusion, x0, key)
    losses, target = [], noise
    for index, width in enumerate(widths):
        dropout_key = jax.random.fold_in(key, 1000 + index)
        eps = network.apply(params, x_t, t, dropout_rng=dropout_key,
                            **{network.branch_arg: width}).astype(jnp.float32)
        losses.append(jnp.mean(jnp.square(eps - target)))
        if index == 0:
            target = (1.0 - distillation) * noise + distillation * jax.lax.stop_gradient(eps)
    per_width = jnp.stack(losses)
    return per_width.sum(), per_width


def split_microbatches(batch: jax.Array, microbatch_size: int) -> jax.Array:
    """(B, ...) -> (B // microbatch_size, microbatch_size, ...), image i in microbatch i % count.

    Strided rather than contiguous, so that under a batch-sharded jit every microbatch is spread
    over all devices as the batch is, and slicing one out needs no communication.
    """
    if microbatch_size <= 0 or batch.shape[0] % microbatch_size:
        raise ValueError(f"training.microbatch_size={microbatch_size} does not divide the batch of "
                         f"{batch.shape[0]}; set it to a divisor, or 0 for the whole batch")
    count = batch.shape[0] // microbatch_size
    return jnp.moveaxis(batch.reshape(microbatch_size, count, *batch.shape[1:]), 1, 0)


def accumulate_gradients(gradients: Callable, batch: jax.Array, key: jax.Array,
                         microbatch_size: int, *, unroll: bool | None = None) -> Any:
    """`gradients(batch, key)` averaged over microbatches of `microbatch_size` images (0: one).

    Why: activations then scale with the microbatch, not the batch, which is what fits a large
    batch in an accelerator's memory. Each microbatch draws its own randomness from
    `fold_in(key, index)`. The loop is a `lax.scan` (one compiled body), except in CPU programs
    where it is unrolled by default: XLA:CPU ran this scan 14x slower (CIFAR-10, batch 32 as
    4 x 8: 347 s a step against 24 s). The default is chosen as the program is lowered, for the
    platform it is lowered for.
    """
    if microbatch_size in (0, batch.shape[0]):
        return gradients(batch, key)
    parts = split_microbatches(batch, microbatch_size)

    def add(total: Any, index_and_part: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
        index, part = index_and_part
        result = gradients(part, jax.random.fold_in(key, index))
        return jax.tree_util.tree_map(jnp.add, total, result), None

    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                   jax.eval_shape(gradients, parts[0], key))

    def loop(unroll: bool) -> Any:
        return jax.lax.scan(add, zeros, (jnp.arange(len(parts)), parts), unroll=unroll)[0]

    total = (loop(unroll) if unroll is not None
             else jax.lax.platform_dependent(cpu=lambda: loop(True), default=lambda: loop(False)))
    return jax.tree_util.tree_map(lambda x: x / len(parts), total)


def make_train_step(network: Network, diffusion: Diffusion, training: ml_collections.ConfigDict,
                    *, state_sharding: Any = None, batch_sharding: NamedSharding | None = None,
                    loss: Callable | None = None) -> Callable:
    """Returns `step(state, batch, rng, widths) -> (state, metrics)`, jitted, state donated.

    `loss(network, diffusion, params, images, key, widths) -> (total, per-width losses)`: a
    strategy's own (AdaDiff's trains every exit at once); by default the sandwich's, distilled
    in place where `training.distillation` > 0.

    `widths` is static; the key of a step is `fold_in(rng, state.step)`, so a resumed run draws
    exactly the randomness an uninterrupted one would. With `training.microbatch_size`, the
    gradients are averaged over microbatches (`accumulate_gradients`). With shardings, the step
    is one SPMD program over their mesh: the batch split across devices, the state as
    `state_sharding` says.
    """
    optimizer = make_optimizer(training)
    lr_schedule = learning_rate_schedule(training)
    decay = training.ema_decay
    microbatch_size = training.get("microbatch_size", 0)
    if loss is None:
        loss = functools.partial(sandwich_loss, distillation=training.get("distillation", 0.0))

    def step(state: TrainState, batch: jax.Array, rng: jax.Array,
             widths: tuple[float, ...]) -> tuple[TrainState, dict[str, jax.Array]]:
        chex.assert_rank(batch, 4)
        key = jax.random.fold_in(rng, state.step)

        def gradients(images: jax.Array, images_key: jax.Array) -> Any:
            return jax.value_and_grad(
                lambda p: loss(network, diffusion, p, images, images_key, widths),
                has_aux=True)(state.params)

        (total, per_width), grads = accumulate_gradients(gradients, batch, key, microbatch_size)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = ema_update(state.ema_params, params, decay)
        metrics = {"loss": total, "loss_per_width": per_width, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": lr_schedule(state.step)}
        new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params,
                               opt_state=opt_state)
        return new_state, metrics

    return jit_train_step(step, "widths", training, state_sharding, batch_sharding)


def jit_train_step(step: Callable, static_name: str, training: ml_collections.ConfigDict,
                   state_sharding: Any, batch_sharding: NamedSharding | None) -> Callable:
    """`step(state, batch, rng, <static_name>)` jitted with the state donated, as one SPMD
    program over the shardings' mesh where they are given."""
    if batch_sharding is None:
        platform, shardings = jax.default_backend(), {}
    else:
        replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
        platform = batch_sharding.mesh.devices.flat[0].platform
        shardings = {"in_shardings": (state_sharding, batch_sharding, replicated),
                     "out_shardings": (state_sharding, replicated)}
    return jax.jit(step, static_argnames=static_name, donate_argnums=0,
                   compiler_options=_compiler_options(platform, training), **shardings)


def _compiler_options(platform: str, training: ml_collections.ConfigDict) -> dict | None:
    """XLA:CPU's scheduler as `training.cpu_scheduler` says; other platforms' defaults."""
    scheduler = training.get("cpu_scheduler", "memory")
    if scheduler not in CPU_SCHEDULERS:
        raise ValueError(f"config.training.cpu_scheduler={scheduler!r}: choose one of "
                         f"{list(CPU_SCHEDULERS)}")
    if platform != "cpu":
        return None
    return {"xla_cpu_enable_concurrency_optimized_scheduler": scheduler == "concurrency"}
