"""The supernet training loop: data -> sandwich steps -> EMA -> checkpoints, resumable."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from tqdm import tqdm

from ddsm_jax.data.pipeline import load_dataset, train_batches
from ddsm_jax.diffusion.schedules import Diffusion, diffusion_from_config
from ddsm_jax.models.network import Network, init_network
from ddsm_jax.training.checkpoint import Checkpointer
from ddsm_jax.training.metrics import JsonlWriter
from ddsm_jax.training.sandwich import sandwich_widths
from ddsm_jax.training.train_step import TrainState, make_optimizer, make_train_step


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class TrainResult:
    network: Network
    diffusion: Diffusion
    state: TrainState


def _check_finite(step: int, loss: float, config: ml_collections.ConfigDict) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"the training loss became {loss} at step {step}; lower training.learning_rate "
            f"(now {config.training.learning_rate}) or training.grad_clip and restart from the last "
            f"checkpoint")


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainResult:
    """Trains (or resumes training of) the supernet in `workdir` up to training.num_steps."""
    workdir = Path(workdir)
    training = config.training
    dataset = load_dataset(config.data)  # first: a missing data set should fail before compiling
    network, params = init_network(config, jax.random.key(config.seed))
    diffusion = diffusion_from_config(config.diffusion)
    state = TrainState.create(params, make_optimizer(training))
    batches = train_batches(dataset, training.batch_size, seed=config.seed,
                            random_flip=config.data.random_flip)

    checkpointer = Checkpointer(workdir / "checkpoints")
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        state, data_state = restored
        batches.set_state(data_state)

    train_step = make_train_step(network, diffusion, training)
    rng = jax.random.fold_in(jax.random.key(config.seed), 1)  # apart from the init key
    start = int(state.step)
    writer = JsonlWriter(workdir / "metrics.jsonl")
    progress = tqdm(range(start, training.num_steps), initial=start, total=training.num_steps,
                    desc="train", unit="step", dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0
    try:
        for step in progress:
            widths = sandwich_widths(network.widths, config.seed, step)
            batch = jnp.asarray(next(batches))
            state, metrics = train_step(state, batch, rng, widths)
            window_steps += 1
            done = step + 1
            if done % training.log_every == 0 or done == training.num_steps:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                images_per_sec = window_steps * training.batch_size / elapsed
                _check_finite(done, float(metrics["loss"]), config)
                per_width = {f"loss_w{w}": l for w, l in zip(widths, metrics.pop("loss_per_width"))}
                writer.write(done, {**metrics, **per_width, "images_per_sec": images_per_sec,
                                    "step_time": elapsed / window_steps})
                progress.set_postfix(loss=f"{float(metrics['loss']):.4f}", img_s=f"{images_per_sec:.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if done % training.checkpoint_every == 0 or done == training.num_steps:
                checkpointer.save(done, state, batches.get_state())
    finally:
        progress.close()
        writer.close()
        checkpointer.wait()
        checkpointer.close()
    return TrainResult(network, diffusion, state)


def load_trained(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainResult:
    """The latest checkpoint of `workdir`; a clear error when there is none."""
    network, params = init_network(config, jax.random.key(config.seed))
    state = TrainState.create(params, make_optimizer(config.training))
    checkpointer = Checkpointer(Path(workdir) / "checkpoints")
    restored = checkpointer.restore_latest(state)
    checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {Path(workdir) / 'checkpoints'}; "
                                f"run --mode=train with this --workdir first")
    return TrainResult(network, diffusion_from_config(config.diffusion), restored[0])
