"""The supernet training loop: data -> sharded sandwich steps -> EMA -> checkpoints, resumable.

Runs unchanged on one CPU, on 8 simulated devices, and on every host of a pod: each process
feeds its own rows of the global batch, and only process 0 writes metrics and pictures.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from tqdm import tqdm

from ddsm_jax.common_types import Params, PathLike
from ddsm_jax.data.pipeline import ImageDataset, load_dataset, train_batches
from ddsm_jax.diffusion.schedules import Diffusion, diffusion_from_config
from ddsm_jax.grids import WidthGrids
from ddsm_jax.layout import Stream, Workdir, stream_key
from ddsm_jax.models.network import Network, init_network
from ddsm_jax.training.checkpoint import Checkpointer, network_identity
from ddsm_jax.training.curriculum import Curriculum
from ddsm_jax.training.metrics import MetricWriter
from ddsm_jax.training.preemption import PreemptionWatch
from ddsm_jax.training.sharding import batch_sharding, global_batch, make_mesh
from ddsm_jax.training.train_step import TrainState, make_optimizer, sharded_train_state
from ddsm_jax.utils.files import write_text_atomically


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class TrainResult:
    network: Network
    diffusion: Diffusion
    state: TrainState
    preempted: bool = False


def _check_finite(step: int, loss: float, config: ml_collections.ConfigDict) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"the training loss became {loss} at step {step}; lower training.learning_rate "
            f"(now {config.training.learning_rate}) or training.grad_clip and restart from the last "
            f"checkpoint")


def _initial_state(config: ml_collections.ConfigDict) -> tuple[Network, TrainState, object]:
    """Fresh parameters placed straight into their shardings, and those shardings."""
    network, params = init_network(config, jax.random.key(config.seed))
    state, sharding = sharded_train_state(params, make_optimizer(config.training),
                                          make_mesh(config.mesh))
    return network, state, sharding


def record_config(layout: Workdir, config: ml_collections.ConfigDict) -> None:
    """config.json: the latest run's config, written once the run is known to fit the workdir."""
    write_text_atomically(layout.config, config.to_json_best_effort(indent=2))


def train(config: ml_collections.ConfigDict, workdir: PathLike,
          dataset: ImageDataset | None = None, *,
          initial_params: Callable[[], Params] | None = None) -> TrainResult:
    """Trains (or resumes training of) the supernet in `workdir` up to training.num_steps.
    `dataset`: the loaded `config.data` (loaded here when None). `initial_params`: where a run
    starts from given weights (pruned ones), called only when there is no checkpoint."""
    layout = Workdir(workdir)
    training = config.training
    if dataset is None:
        dataset = load_dataset(config.data)  # first: a missing data set should fail before compiling
    process_count, is_main = jax.process_count(), jax.process_index() == 0
    mesh = make_mesh(config.mesh)
    if training.batch_size % mesh.size:
        raise ValueError(f"training.batch_size={training.batch_size} must be a multiple of the "
                         f"{mesh.size} devices it is split over")
    microbatch_size = training.get("microbatch_size", 0)
    if microbatch_size and (training.batch_size % microbatch_size or microbatch_size % mesh.size):
        raise ValueError(f"training.microbatch_size={microbatch_size} must divide "
                         f"training.batch_size={training.batch_size} and be a multiple of the "
                         f"{mesh.size} devices; or 0 for no microbatches")
    network, state, state_sharding = _initial_state(config)
    diffusion = diffusion_from_config(config.diffusion)
    data_sharding = batch_sharding(mesh)
    batches = train_batches(dataset, training.batch_size // process_count, seed=config.seed,
                            random_flip=config.data.random_flip,
                            process_index=jax.process_index(), process_count=process_count)

    checkpointer = Checkpointer(layout.checkpoints, max_to_keep=training.keep_checkpoints,
                                identity=network_identity(config))
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        state, data_state = restored
        batches.set_state(data_state)
    elif initial_params is not None:
        state, _ = sharded_train_state(initial_params(), make_optimizer(training), mesh)
    if is_main:
        record_config(layout, config)

    curriculum = Curriculum.of(config, network)
    train_step = curriculum.make_step(network, diffusion, training, state_sharding=state_sharding,
                                      batch_sharding=data_sharding)
    grids = WidthGrids(config, network, diffusion) if training.sample_every and is_main else None
    rng = stream_key(config.seed, Stream.TRAIN)
    start = int(state.step)
    # One program per sandwich, compiled before the progress bar starts, so that neither its rate
    # and ETA nor the logged images/s count compilation.
    batch_shape = jax.ShapeDtypeStruct((training.batch_size, *network.image_shape), jnp.float32,
                                       sharding=data_sharding)
    compiled = {choice: train_step.lower(state, batch_shape, rng, choice).compile()
                for choice in tqdm(curriculum.choices_between(start, training.num_steps),
                                   desc=f"compiling the train step per {curriculum.unit}",
                                   unit="program", disable=not is_main, leave=False)}
    writer = MetricWriter(layout, start, enabled=is_main)
    preemption = PreemptionWatch()
    progress = tqdm(range(start, training.num_steps), initial=start, total=training.num_steps,
                    desc="train", unit="step", dynamic_ncols=True, disable=not is_main)
    window_start, window_steps, preempted = time.perf_counter(), 0, False
    # checkpointer.wait raises if the last save failed.
    cleanup = [progress.close, preemption.close, writer.close, checkpointer.wait,
               checkpointer.close]
    try:
        for step in progress:
            choice = curriculum.choice(step)
            batch = global_batch(next(batches), data_sharding)
            state, metrics = compiled[choice](state, batch, rng)
            checkpointer.check_for_errors()  # a failed background save stops the run at once
            window_steps += 1
            done = step + 1
            if done % training.log_every == 0 or done == training.num_steps:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                images_per_sec = window_steps * training.batch_size / elapsed
                _check_finite(done, float(metrics["loss"]), config)
                per_width = dict(zip(curriculum.loss_names(choice), metrics.pop("loss_per_width")))
                writer.write_scalars(done, {**metrics, **per_width, "images_per_sec": images_per_sec,
                                            "step_time": elapsed / window_steps})
                progress.set_postfix(loss=f"{float(metrics['loss']):.4f}", img_s=f"{images_per_sec:.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if grids is not None and done % training.sample_every == 0:
                _, grid = grids.draw(state.ema_params, layout.samples_at(done))
                writer.write_image(done, "samples_per_width", grid)
            preempted = preemption.should_stop(checkpointer.manager, done)
            if done % training.checkpoint_every == 0 or done == training.num_steps or preempted:
                checkpointer.save(done, state, batches.get_state())
            if preempted:
                progress.write(f"stopping after step {done} on request; checkpoint saved, rerun the "
                               f"same command to resume", file=sys.stderr)
                break
    except BaseException:
        _clean_up(cleanup, error_in_flight=True)
        raise
    _clean_up(cleanup, error_in_flight=False)
    return TrainResult(network, diffusion, state, preempted)


def _clean_up(steps: list[Callable[[], None]], error_in_flight: bool) -> None:
    """Runs every clean-up step. The first failure is raised once all have run, unless an error
    is already on its way to the user: a clean-up failing for the same cause (a full disk) must
    not replace it."""
    first = None
    for step in steps:
        try:
            step()
        except Exception as error:
            first = first or error
    if first is not None and not error_in_flight:
        raise first


def _no_checkpoint(checkpoints: PathLike) -> FileNotFoundError:
    return FileNotFoundError(f"no checkpoint in {checkpoints}; "
                             f"run --mode=train with this --workdir first")


def require_checkpoint(workdir: PathLike) -> None:
    """Fails, creating nothing, unless `workdir` holds a finished checkpoint."""
    checkpoints = Workdir(workdir).checkpoints
    if not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        raise _no_checkpoint(checkpoints)


def load_trained(config: ml_collections.ConfigDict, workdir: PathLike) -> TrainResult:
    """The latest checkpoint of `workdir`; a clear error when there is none."""
    checkpoints = Workdir(workdir).checkpoints
    require_checkpoint(workdir)
    network, state, _ = _initial_state(config)
    checkpointer = Checkpointer(checkpoints, identity=network_identity(config))
    restored = checkpointer.restore_latest(state)
    checkpointer.close()
    if restored is None:  # step folders orbax does not count as checkpoints
        raise _no_checkpoint(checkpoints)
    return TrainResult(network, diffusion_from_config(config.diffusion), restored[0])
