"""Step-Adaptive Training (Li et al., arXiv 2312.13307) as one pipeline of the library's parts.

1. The base model: one full-width U-Net trained on every timestep by `config.training` in
   WORKDIR/base (the plain U-Net run: with the same config and seed, the same weights).
2. Its groups: the sampler's timesteps split by log-SNR (`step_groups.split_by_snr`); group g
   trains on the timesteps from its first sampling step to the next group's.
3. Each group's difficulty (the base model's loss on the group's timesteps, or minus its log-SNR)
   and its width from `model.widths`, monotone in difficulty, under `step_adaptive.macs_budget`.
4. Pruning: the base model's channels reordered by Taylor importance |w dL/dw| on the group's
   timesteps (`channel_order`), so that the group's width keeps the channels that matter there;
   where that ordering does not lower the group's loss at its width, the plain leading slice.
5. Fine-tuning: `step_adaptive.finetune_steps` batches, each from one group's timesteps, moving
   that group's model only (the multi-stage step).

Steps 2-4 are recorded, with the base weights they came from, in WORKDIR/step_groups.json; the
groups' boundaries and widths then join the config, so every later mode rebuilds the same network.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddsm_jax.common_types import Params, PathLike
from ddsm_jax.data.sources import ImageDataset
from ddsm_jax.diffusion.losses import epsilon_loss
from ddsm_jax.diffusion.samplers import sampling_timesteps
from ddsm_jax.diffusion.schedules import Diffusion
from ddsm_jax.layout import Stream, Workdir, stream_key
from ddsm_jax.models.cost import width_macs
from ddsm_jax.models.network import Network
from ddsm_jax.provenance import weights_id
from ddsm_jax.strategies import channel_order
from ddsm_jax.strategies.stage_split import stage_ranges
from ddsm_jax.strategies.step_groups import allocate_widths, log_snr, split_by_snr
from ddsm_jax.utils.files import read_json, write_json

DIFFICULTIES = ("loss", "snr")


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The base model's run: the plain full-width U-Net of `config.training`."""
    base = ml_collections.ConfigDict(config.to_dict())
    base.strategy = "ddsm"
    base.model.widths = (1.0,)
    return base


def grouped_config(config: ml_collections.ConfigDict, plan: dict) -> ml_collections.ConfigDict:
    """The group models' run: the plan's boundaries and widths; `training` becomes the
    fine-tuning (its steps and learning rate; each group warms up over its own updates, and its
    EMA averages over at most a tenth of them: the EMA starts at the pruned weights, which a
    longer average would keep mixing in). `step_adaptive.base_steps` keeps the base run's
    length, for the training cost."""
    section = config.step_adaptive
    grouped = ml_collections.ConfigDict(config.to_dict())
    grouped.step_adaptive.boundaries = tuple(plan["boundaries"])
    grouped.step_adaptive.group_widths = tuple(plan["group_widths"])
    grouped.step_adaptive.base_steps = config.training.num_steps
    grouped.training.num_steps = section.finetune_steps
    grouped.training.learning_rate = section.finetune_learning_rate
    grouped.training.warmup_steps = config.training.warmup_steps // section.num_groups
    updates_per_group = section.finetune_steps / section.num_groups
    grouped.training.ema_decay = min(config.training.ema_decay,
                                     max(0.0, 1 - 10 / updates_per_group))
    return grouped


def check_config(config: ml_collections.ConfigDict) -> None:
    section = config.step_adaptive
    if section.difficulty not in DIFFICULTIES:
        raise ValueError(f"step_adaptive.difficulty={section.difficulty!r}: choose one of "
                         f"{list(DIFFICULTIES)}")
    if section.finetune_steps < 1 or section.probe_images < 1:
        raise ValueError("step_adaptive.finetune_steps and step_adaptive.probe_images must be "
                         "at least 1")
    if bool(section.boundaries) != bool(section.group_widths):
        raise ValueError("give step_adaptive.boundaries and step_adaptive.group_widths together "
                         "(or neither, to have the base phase choose them)")


def resolve(config: ml_collections.ConfigDict, workdir: PathLike) -> ml_collections.ConfigDict:
    """The group models' config of a trained workdir (from its step_groups.json)."""
    path = Workdir(workdir).step_groups
    if not path.exists():
        raise FileNotFoundError(f"no {path.name} in {workdir}: its step-adaptive training has "
                                f"not got past the base model; run --mode=train first")
    return grouped_config(config, read_json(path))


def plan_groups(config: ml_collections.ConfigDict, network: Network, diffusion: Diffusion,
                params: Params, images: np.ndarray) -> tuple[dict, list[Params]]:
    """Steps 2-4 on the base model's (EMA) `params`: the plan (JSON-able) and each group's
    reordered parameters."""
    section = config.step_adaptive
    timesteps = np.sort(sampling_timesteps(config.sampling.method, diffusion.num_timesteps,
                                           config.sampling.num_steps, config.sampling.spacing))
    snr = log_snr(np.asarray(diffusion.alphas_cumprod), timesteps)
    if section.boundaries:
        boundaries = tuple(int(b) for b in section.boundaries)
        groups = np.searchsorted(np.asarray(boundaries), timesteps, side="right")
    else:
        groups = split_by_snr(snr, section.num_groups)
        boundaries = tuple(int(timesteps[groups == g].min()) for g in range(1, groups.max() + 1))
    ranges = stage_ranges(boundaries, diffusion.num_timesteps)
    sizes = np.bincount(groups, minlength=len(ranges))
    probe = _Probe(network, diffusion, images, config.seed, config.training.batch_size)
    full_loss, grads = zip(*(probe.loss_and_grads(params, r, g) for g, r in enumerate(ranges)))
    if section.difficulty == "loss":
        difficulty = [float(v) for v in full_loss]
    else:
        difficulty = [-float(snr[groups == g].mean()) if sizes[g] else 0.0
                      for g in range(len(ranges))]
    widths = tuple(float(w) for w in config.model.widths)
    macs = [width_macs(network, params, w).total for w in widths]
    if section.group_widths:
        group_widths = tuple(float(w) for w in section.group_widths)
    else:
        group_widths = tuple(widths[i] for i in allocate_widths(difficulty, sizes, macs,
                                                               section.macs_budget))
    # Importance ordering where it lowers the group's loss at its width; else the plain slice.
    host_params = jax.device_get(params)
    initial, ordering, sliced, ordered = [], [], [], []
    for group, (t_range, width, grad) in enumerate(zip(ranges, group_widths, grads)):
        candidate = channel_order.order_by_importance(host_params, jax.device_get(grad),
                                                      config.model.num_groups)
        sliced.append(probe.loss(params, t_range, group, width))
        ordered.append(probe.loss(candidate, t_range, group, width))
        keep = ordered[-1] < sliced[-1]
        initial.append(candidate if keep else host_params)
        ordering.append("importance" if keep else "none")
    group_macs = [width_macs(network, params, w).total for w in group_widths]
    ratio = float(np.dot(sizes, group_macs) / sizes.sum() / macs[0])
    plan = {"timesteps": timesteps.tolist(), "boundaries": list(boundaries),
            "steps_per_group": sizes.tolist(), "difficulty_measure": section.difficulty,
            "difficulty": difficulty, "group_widths": list(group_widths), "macs_ratio": ratio,
            "ordering": ordering,
            "probe": {"images": len(images), "loss_full_width": [float(v) for v in full_loss],
                      "loss_at_width_unordered": sliced, "loss_at_width_ordered": ordered}}
    return plan, initial


class _Probe:
    """The base model's epsilon loss (and its gradient) on one group's timesteps, on the same
    images and noise for every call on that group, in chunks of at most `chunk` images."""

    def __init__(self, network: Network, diffusion: Diffusion, images: np.ndarray, seed: int,
                 chunk: int):
        self.chunks = [jnp.asarray(images[i:i + chunk]) for i in range(0, len(images), chunk)]
        self.key = stream_key(seed, Stream.PROBE)

        def loss(params: Params, images: jax.Array, key: jax.Array, low: jax.Array,
                 high: jax.Array, width: float) -> jax.Array:
            def eps_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
                return network.apply(params, x_t, t, width=width)

            return epsilon_loss(eps_fn, diffusion, images, key, t_range=(low, high))

        self._loss = jax.jit(loss, static_argnames="width")
        self._loss_and_grads = jax.jit(jax.value_and_grad(loss), static_argnames="width")

    def _mean(self, fn: Any, params: Params, t_range: tuple[int, int], group: int,
              width: float) -> Any:
        """`fn` averaged over the chunks, weighted by their sizes."""
        key = jax.random.fold_in(self.key, group)
        weights = np.array([len(c) for c in self.chunks]) / sum(len(c) for c in self.chunks)
        parts = [fn(params, c, jax.random.fold_in(key, i), *t_range, width=width)
                 for i, c in enumerate(self.chunks)]
        return jax.tree_util.tree_map(lambda *xs: sum(w * x for w, x in zip(weights, xs)),
                                      *parts)

    def loss_and_grads(self, params: Params, t_range: tuple[int, int],
                       group: int) -> tuple[float, Params]:
        value, grads = self._mean(self._loss_and_grads, params, t_range, group, 1.0)
        return float(value), grads

    def loss(self, params: Params, t_range: tuple[int, int], group: int, width: float) -> float:
        return float(self._mean(self._loss, params, t_range, group, width))


def plan_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Every setting a plan depends on besides the base weights."""
    section, sampling = config.step_adaptive, config.sampling
    return {"step_adaptive": {k: section[k] for k in ("num_groups", "macs_budget", "difficulty",
                                                      "probe_images")},
            "given": {"boundaries": [int(b) for b in section.boundaries],
                      "group_widths": [float(w) for w in section.group_widths]},
            "model.widths": [float(w) for w in config.model.widths],
            "training.batch_size": config.training.batch_size,
            "sampling": {k: sampling[k] for k in ("method", "num_steps", "spacing")}}


def probe_images(dataset: ImageDataset, count: int) -> np.ndarray:
    """The first `count` training images (fewer where the set is smaller)."""
    return np.asarray(dataset.train[:min(count, len(dataset.train))], np.float32)


def group_params(pruned: list[Params]) -> Params:
    return {"groups": dict(enumerate(pruned))}


def load_or_plan(config: ml_collections.ConfigDict, workdir: PathLike, network: Network,
                 diffusion: Diffusion, params: Params, step: int, dataset: ImageDataset,
                 is_main: bool) -> tuple[dict, Any]:
    """The workdir's plan, or a new one (written by the main process); and a function giving
    the groups' initial (pruned) parameters, computed only if they are needed."""
    path = Workdir(workdir).step_groups
    base, settings = weights_id(step, params), plan_settings(config)
    if path.exists():
        plan = read_json(path)
        if plan.get("base_weights") != base:
            raise ValueError(f"{workdir}'s group models were pruned from other base weights "
                             f"(step {plan.get('base_weights', {}).get('step')}) than "
                             f"{Workdir(workdir).base}'s (step {step}); use a new --workdir")
        if plan.get("settings") != settings:
            changed = [k for k in settings if plan.get("settings", {}).get(k) != settings[k]]
            raise ValueError(f"{workdir}'s groups were planned with other {', '.join(changed)} "
                             f"settings ({path.name} has them); use a new --workdir or the "
                             f"settings it was planned with")

        def initial() -> Params:
            _, pruned = plan_groups(grouped_config(config, plan), network, diffusion, params,
                                    probe_images(dataset, config.step_adaptive.probe_images))
            return group_params(pruned)

        return plan, initial
    plan, pruned = plan_groups(config, network, diffusion, params,
                               probe_images(dataset, config.step_adaptive.probe_images))
    plan.update(base_weights=base, settings=settings)
    if is_main:
        write_json(path, plan)
    return plan, lambda: group_params(pruned)


def load_base(config: ml_collections.ConfigDict, workdir: PathLike) -> Any:
    """The trained base model of `workdir` (a `TrainResult`)."""
    from ddsm_jax.training.train import load_trained

    return load_trained(base_config(config), Workdir(workdir).base)


def train_groups(config: ml_collections.ConfigDict, workdir: PathLike,
                 dataset: ImageDataset) -> tuple[Any, ml_collections.ConfigDict]:
    """The whole training (base model, plan, fine-tuning; each resumes where it stopped); its
    `TrainResult` and the group models' config."""
    from ddsm_jax.training.train import train

    base = train(base_config(config), Workdir(workdir).base, dataset)
    if base.preempted:
        return base, config
    plan, initial = load_or_plan(config, workdir, base.network, base.diffusion,
                                 base.state.ema_params, int(base.state.step), dataset,
                                 jax.process_index() == 0)
    grouped = grouped_config(config, plan)
    return train(grouped, workdir, dataset, initial_params=initial), grouped
