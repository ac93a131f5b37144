"""`--mode=evaluate`: quality, cost and time of full width, every uniform width, the schedule,
and full width with fewer steps (the baseline a step-aware saving must beat).

The baseline runs the evaluated network's own full-compute rule with fewer steps (DDSM: the
full-width U-Net; multistage: every stage's decoder at full width), or, where the strategy
starts from a plain U-Net (step_adaptive's base model), that U-Net at every step count up to
the sampler's.

Every entry samples from the same initial noise with the same per-step noise, so the
differences between entries are differences of width, not of luck. MACs ratios are against the
full-width U-Net at every step, for every strategy, so that they compare across strategies; the
training run's MACs are recorded too. Writes
`DIR/eval/metrics.json` and one sample grid per entry (plus `samples.png`, all side by side).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from ddsm_jax.common_types import Params, PathLike
from ddsm_jax.diffusion.schedules import Diffusion
from ddsm_jax.eval.feature_space import feature_extractor, reference_statistics
from ddsm_jax.eval.features import compute_features
from ddsm_jax.eval.metrics import kernel_inception_distance
from ddsm_jax.layout import Stream, Workdir, stream_key
from ddsm_jax.models.cost import SchedulePrices
from ddsm_jax.models.network import Network, native_entry, strategy_name
from ddsm_jax.sampling import ScheduleSampler, initial_noise, sample_in_batches, stream_draws
from ddsm_jax.training.curriculum import FORWARD_AND_BACKWARD, training_macs
from ddsm_jax.utils.files import write_json
from ddsm_jax.utils.images import make_grid, save_grid
from ddsm_jax.utils.plots import save_side_by_side
from ddsm_jax.width_schedule import WidthSchedule

GRID_IMAGES = 64


def evaluate(config: ml_collections.ConfigDict, workdir: PathLike, network: Network,
             diffusion: Diffusion, params: Params, *, schedule: WidthSchedule | None = None,
             weights: dict[str, Any] | None = None, baseline: tuple[Network, Params] | None = None,
             training: dict[str, float] | None = None, progress: bool = True) -> dict[str, Any]:
    """Samples `config.eval.num_samples` images per entry, scores them, writes the results
    (with `weights`, the `weights_id` of `params`); `baseline`: the network and weights run with
    fewer steps, where they are not the evaluated ones; `training`: the training cost where it
    is not `config.training`'s (a mixture's: its members')."""
    layout = Workdir(workdir)
    extractor, extractor_info = feature_extractor(config, workdir)
    reference = reference_statistics(config, extractor, workdir, progress=progress)
    sampler = ScheduleSampler(network, diffusion, config.sampling)
    key = stream_key(config.seed, Stream.EVALUATE)
    noise, sample_key = stream_draws(key, config.eval.num_samples, network.image_shape)
    batch = config.sampling.batch_size
    timing_noise = initial_noise(jax.random.fold_in(key, 2), batch, network.image_shape)
    prices = SchedulePrices.of(network, params, sampler.timesteps, config)

    def score(images: np.ndarray) -> dict[str, float]:
        features = compute_features(extractor, images, batch_size=config.eval.feature_batch_size)
        result = {"fd": reference.frechet_distance(features)}
        if reference.features is not None:
            kid, kid_std = kernel_inception_distance(
                features, reference.features, num_subsets=config.eval.kid_subsets,
                subset_size=config.eval.kid_subset_size, seed=config.seed)
            result.update(kid=kid, kid_std=kid_std)
        return result

    entries = [("full", sampler, sampler.uniform(0), params)]
    entries += [(f"uniform {network.widths[i]}", sampler, sampler.uniform(i), params)
                for i in network.global_indices if i]
    if schedule is not None:  # on its own timesteps where the search chose them
        schedule_sampler = sampler.for_schedule(schedule)
        entries.append(("schedule", schedule_sampler, schedule_sampler.to_indices(schedule),
                        params))
    full_macs = prices.reference * sampler.num_steps  # every ratio: of full width, all steps
    ratios = [*BASELINE_RATIOS]
    if schedule is not None:
        ratios.append(SchedulePrices.of(network, params, schedule_sampler.timesteps, config)(
            entries[-1][2])["macs_ratio"])
    base_network, base_params = baseline or (network, params)
    base_prices = SchedulePrices.of(base_network, base_params, sampler.timesteps, config)
    per_step = base_prices(sampler.uniform(0))["macs_ratio"]  # its full rule's, at all steps
    fractions = [r / per_step for r in ratios] + ([1.0] if baseline is not None else [])
    for steps in fewer_step_counts(sampler.num_steps, fractions, include_all=baseline is not None):
        fewer = ScheduleSampler(base_network, diffusion, _with_steps(config.sampling, steps))
        entries.append((f"fewer {steps}", fewer, fewer.uniform(0), base_params))
    if strategy_name(config) == "adadiff":  # its own rule: exits where the network is certain
        from ddsm_jax.strategies.adadiff import ExitSampler

        exit_sampler = ExitSampler(network, diffusion, config.sampling)
        batch_exits = ExitSampler(network, diffusion, config.sampling, per_batch=True)
        block_macs = exit_sampler.block_macs(params)
        entries += [(f"threshold {tau:g}", exit_sampler, float(tau), params)
                    for tau in config.adadiff.thresholds]
    baseline_label = "full" if baseline is not None else native_entry(strategy_name(config))
    results, grids, titles = {}, [], []
    for name, entry_sampler, indices, entry_params in tqdm(entries, desc="evaluate",
                                                           disable=not progress):
        images = sample_in_batches(entry_sampler, entry_params, indices, noise, sample_key, batch)
        exits = name.startswith("threshold")
        timed = batch_exits if exits else entry_sampler  # AdaDiff's time: exits per batch
        if exits:  # compiled outside the timing (the others compiled as they sampled)
            jax.block_until_ready(timed(entry_params, indices, timing_noise, sample_key))
        start = time.perf_counter()
        timing = jax.block_until_ready(timed(entry_params, indices, timing_noise, sample_key))
        seconds = time.perf_counter() - start
        if exits:  # per-sample exits: (images, decoder blocks run - 1)
            images, taken = images
            per_image = block_macs[taken].sum(axis=1)
            cost = {"macs_mean": float(per_image.mean() / sampler.num_steps),
                    "macs_total": float(per_image.mean()),
                    "exit_depth_mean": float((taken + 1).mean() / len(block_macs)),
                    "timed_macs_ratio": float(block_macs[np.asarray(timing[1])].sum(axis=1).mean()
                                              / full_macs)}
        else:
            entry_prices = (prices if entry_sampler is sampler else
                            SchedulePrices.of(entry_sampler.network, entry_params,
                                              entry_sampler.timesteps, config))
            cost = entry_prices(indices)
        results[name] = {**score(images), "macs_mean": cost["macs_mean"],
                         "macs_ratio": cost["macs_total"] / full_macs, "seconds": seconds,
                         **{k: cost[k] for k in ("exit_depth_mean", "timed_macs_ratio")
                            if k in cost}}
        save_grid(images[:GRID_IMAGES], layout.eval / f"{name.replace(' ', '_')}.png")
        grids.append(make_grid(images[:GRID_IMAGES], padding=1, scale=_scale(network)))
        label = (f"{baseline_label}, {name.split()[1]} steps" if name.startswith("fewer")
                 else name)
        titles.append(f"{label}: FD {results[name]['fd']:.3g}, "
                      f"{results[name]['macs_ratio']:.2f}x MACs")
    save_side_by_side(grids, titles, layout.eval / "samples.png", caption=(
        f"FD of each entry on the same {config.eval.num_samples} samples (the evaluation's "
        f"noise: neither the search's nor its validation's); MACs as a fraction of full "
        f"width's at {sampler.num_steps} steps"))
    noise_images = np.clip(np.asarray(noise), -1.0, 1.0)
    metrics = {
        "full": results["full"],
        "uniform": {name.split()[1]: value for name, value in results.items()
                    if name.startswith("uniform")},
        **({"schedule": {**results["schedule"], **(
            {"timesteps": list(schedule.timesteps)} if schedule.timesteps_searched else {})}}
           if schedule is not None else {}),
        "fewer_steps": {name.split()[1]: value for name, value in results.items()
                        if name.startswith("fewer")},
        "fewer_steps_of": baseline_label,
        **({"thresholds": {name.split()[1]: value for name, value in results.items()
                           if name.startswith("threshold")}}
           if strategy_name(config) == "adadiff" else {}),
        "strategy": strategy_name(config),
        "training": training or _training_cost(config, network, params, prices.reference),
        **({"branch_labels": list(network.labels)} if hasattr(network, "labels") else {}),
        "noise": score(noise_images),
        "num_samples": int(config.eval.num_samples),
        "seed": int(config.seed),
        "seconds_batch_size": batch,
        "sampler": {"method": sampler.method, "num_steps": sampler.num_steps},
        "features": {"name": extractor.name, "dim": extractor.dim, **extractor_info},
        "reference": reference.source,
        "weights": weights,
    }
    write_json(layout.eval_metrics, metrics)
    return metrics


# Full width with fewer steps at these fractions of the MACs (and at the schedule's): the
# obvious alternative any step-aware saving must beat.
BASELINE_RATIOS = (0.25, 0.5, 0.75)


def fewer_step_counts(num_steps: int, step_fractions: list[float], *,
                      include_all: bool = False) -> list[int]:
    """The distinct step counts nearest to each fraction of `num_steps`, ascending: below it,
    or up to it with `include_all`."""
    counts = {max(1, round(num_steps * f)) for f in step_fractions}
    return sorted(c for c in counts if c < num_steps or (include_all and c == num_steps))


def _with_steps(sampling: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
    changed = ml_collections.ConfigDict(sampling.to_dict())
    changed.num_steps = steps
    return changed


def _training_cost(config: ml_collections.ConfigDict, network: Network, params: Params,
                   reference_macs: float) -> dict[str, float]:
    """The training run's MACs, and their ratio to training the full U-Net alone on as many
    images (a sandwich step trains three sub-networks; a multi-stage step one decoder)."""
    cost = training_macs(config, network, params)
    plain = FORWARD_AND_BACKWARD * cost["images"] * reference_macs
    return {**cost, "macs_ratio": cost["macs"] / plain}


def _scale(network: Network) -> int:
    return max(1, 32 // network.image_shape[0])

