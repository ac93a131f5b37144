"""A rule instead of a search: Step-Adaptive Training's width allocation applied to DDSM's
supernet, scored beside the searched schedule on the same evaluation noise and features.

    python -m benchmarks.snr_allocation --workdir=workdirs/digits --budget=0.5 --groups=4

The sampler's steps are split into `--groups` contiguous groups by log-SNR
(`ddsm_jax.strategies.step_groups`); each group's difficulty is measured on held-out images: the
full-width noise-prediction error at the group's timesteps (`loss`), or, as a rule needing no
network, its noise level (`noise`: noisier is harder). Widths are then given monotone in
difficulty under the MACs budget. This isolates the allocation rule from pruning and
fine-tuning (which the full strategy adds): if the rule matched the search here, the search
would not be worth its cost. Run after `--mode=all` (it reads the workdir's eval/metrics.json).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks.common import report
from ddsm_jax.data.pipeline import load_dataset
from ddsm_jax.diffusion.schedules import q_sample
from ddsm_jax.eval.feature_space import feature_extractor, reference_statistics
from ddsm_jax.eval.features import compute_features
from ddsm_jax.layout import Stream, Workdir, stream_key
from ddsm_jax.models.cost import macs_table, schedule_cost
from ddsm_jax.sampling import ScheduleSampler, sample_in_batches, stream_draws
from ddsm_jax.strategies import step_groups
from ddsm_jax.training.train import load_trained
from ddsm_jax.utils.files import read_json

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/digits", "A workdir after --mode=all.")
_BUDGET = flags.DEFINE_float("budget", 0.5, "Mean MACs per step, as a fraction of full width's.")
_GROUPS = flags.DEFINE_integer("groups", 4, "Timestep groups.")
_LOSS_IMAGES = flags.DEFINE_integer("loss_images", 512, "Held-out images per difficulty estimate.")


def group_losses(network, diffusion, params, images: np.ndarray, timesteps: np.ndarray,
                 groups: np.ndarray, key: jax.Array) -> np.ndarray:
    """Mean full-width noise-prediction error of each group, over its timesteps."""
    x0 = jnp.asarray(images)
    noise = jax.random.normal(key, x0.shape)

    @jax.jit
    def loss_at(t: jax.Array) -> jax.Array:
        t_batch = jnp.full((x0.shape[0],), t, jnp.int32)
        eps = network.apply(params, q_sample(diffusion, x0, t_batch, noise), t_batch, width=1.0)
        return jnp.mean(jnp.square(eps - noise))

    per_step = np.array([float(loss_at(t)) for t in timesteps])
    return np.array([per_step[groups == g].mean() for g in range(groups.max() + 1)])


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    layout = Workdir(_WORKDIR.value)
    trained = load_trained(config, layout.root)
    network, diffusion, params = trained.network, trained.diffusion, trained.state.ema_params
    sampler = ScheduleSampler(network, diffusion, config.sampling)
    timesteps = np.asarray(sampler.timesteps)
    alphas_cumprod = np.asarray(diffusion.alphas_cumprod)
    snr = step_groups.log_snr(alphas_cumprod, timesteps)
    groups = step_groups.split_by_snr(snr, _GROUPS.value)
    sizes = np.bincount(groups)
    per_width = [row["total"] for row in macs_table(network, params).values()]
    held_out = np.asarray(load_dataset(config.data).eval[:_LOSS_IMAGES.value])
    difficulties = {
        "loss": group_losses(network, diffusion, params, held_out, timesteps, groups,
                             jax.random.key(config.seed)),
        "noise": np.array([-snr[groups == g].mean() for g in range(len(sizes))]),
    }
    # The evaluation's own noise and features: comparable with eval/metrics.json's entries.
    extractor, _ = feature_extractor(config, layout.root)
    reference = reference_statistics(config, extractor, layout.root, progress=False)
    noise, sample_key = stream_draws(stream_key(config.seed, Stream.EVALUATE),
                                     config.eval.num_samples, network.image_shape)
    metrics = read_json(layout.eval_metrics)
    rows = [{"entry": "full width", "rule": "-", "macs_ratio": 1.0, "fd": metrics["full"]["fd"]},
            {"entry": "searched schedule", "rule": "evolutionary search",
             "macs_ratio": metrics["schedule"]["macs_ratio"], "fd": metrics["schedule"]["fd"]}]
    for name, difficulty in difficulties.items():
        widths = step_groups.allocate_widths(difficulty, sizes, per_width, _BUDGET.value)
        schedule = np.asarray(widths)[groups]
        images = sample_in_batches(sampler, params, schedule, noise, sample_key,
                                   config.sampling.batch_size)
        fd = reference.frechet_distance(compute_features(
            extractor, images, batch_size=config.eval.feature_batch_size))
        rows.append({"entry": "SNR groups", "rule": f"difficulty = {name}",
                     "macs_ratio": schedule_cost(per_width, schedule)["macs_ratio"], "fd": fd,
                     "group_widths": "/".join(f"{network.widths[w]:g}" for w in widths),
                     "group_sizes": "/".join(str(s) for s in sizes),
                     "difficulty": "/".join(f"{d:.3g}" for d in difficulty)})
    report(rows, [("entry", "entry", "s"), ("rule", "rule", "s"), ("macs_ratio", "MACs", ".3f"),
                  ("fd", "FD", ".2f"), ("group_widths", "widths (noisy first)", "s"),
                  ("group_sizes", "steps", "s"), ("difficulty", "difficulty", "s")],
           notes=[f"{config.eval.num_samples} samples per entry on the evaluation noise; "
                  f"{_GROUPS.value} groups of the {len(timesteps)} sampling steps, budget "
                  f"{_BUDGET.value:g}"])


if __name__ == "__main__":
    app.run(main)
