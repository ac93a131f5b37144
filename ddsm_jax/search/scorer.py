"""Fitness of width schedules: FD of their samples, all drawn from one shared noise, plus cost."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import chex
import ml_collections
import numpy as np

from ddsm_jax.common_types import Params
from ddsm_jax.diffusion.schedules import Diffusion
from ddsm_jax.eval.feature_space import feature_extractor, reference_statistics
from ddsm_jax.eval.features import compute_features
from ddsm_jax.layout import Stream, stream_key
from ddsm_jax.models.cost import SchedulePrices
from ddsm_jax.models.network import Network
from ddsm_jax.sampling import ScheduleSampler, stream_draws
from ddsm_jax.search.population import PopulationSampler
from ddsm_jax.search.trajectory_cache import TrajectoryCache, keep_steps_for_budget, state_bytes


@dataclasses.dataclass(frozen=True)
class Scores:
    fd: np.ndarray
    macs_mean: np.ndarray
    macs_ratio: np.ndarray
    network_evaluations: int  # network calls made (each on the N shared-noise samples)
    naive_evaluations: int  # the calls of evaluating every candidate from scratch
    seconds_ratio: np.ndarray | None = None  # predicted from measured branch times, if priced

    def entry(self, i: int) -> dict[str, float]:
        """Candidate i's scores as an archive entry."""
        entry = {"fd": float(self.fd[i]), "macs_mean": float(self.macs_mean[i]),
                 "macs_ratio": float(self.macs_ratio[i])}
        if self.seconds_ratio is not None:
            entry["seconds_ratio"] = float(self.seconds_ratio[i])
        return entry



class ScheduleScorer:
    """Scores populations on one fixed noise (`config.search.num_samples` images) for the whole
    search; `on_noise` gives a scorer on other noise that shares everything else."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, network: Network,
                 diffusion: Diffusion, params: Params, *, progress: bool = True):
        self.config = config
        self.params = params
        self.sampler = ScheduleSampler(network, diffusion, config.sampling)
        search = config.search
        keep_steps = keep_steps_for_budget(
            self.sampler.num_steps, search.population_size,
            state_bytes(search.num_samples, network.image_shape), search.trajectory_cache_mb)
        self.cache = TrajectoryCache(keep_steps) if keep_steps else None
        self.population_sampler = PopulationSampler(self.sampler, keep_steps=keep_steps)
        self.extractor, self.extractor_info = feature_extractor(config, workdir)
        self.reference = reference_statistics(config, self.extractor, workdir, progress=progress)
        self.prices = SchedulePrices.of(network, params, self.sampler.timesteps, config)
        self.seconds: SchedulePrices | None = None  # set where the search prices in seconds
        self.searched_timesteps = search.get("timesteps", "fixed") == "searched"
        if self.searched_timesteps:
            check_timesteps_searchable(network, diffusion.num_timesteps)
        self._draw_noise(config.search.num_samples, Stream.SEARCH)

    def _draw_noise(self, num_samples: int, stream: Stream) -> None:
        self.noise, self.key = stream_draws(stream_key(self.config.seed, stream), num_samples,
                                            self.sampler.network.image_shape)

    def on_noise(self, num_samples: int, stream: Stream) -> ScheduleScorer:
        """The same network, feature space and reference, on `num_samples` images of another
        noise stream (the validation's), without loading any of them again."""
        other = copy.copy(self)
        other._draw_noise(num_samples, stream)
        other.cache = None  # kept states belong to the search noise
        other.population_sampler = PopulationSampler(self.sampler)
        return other

    @property
    def num_widths(self) -> int:
        return len(self.sampler.network.widths)

    @property
    def num_steps(self) -> int:
        return self.sampler.num_steps

    @property
    def width_cost(self) -> np.ndarray:
        """(steps, widths): each width's cost at each step as a fraction of full compute's: its
        MACs (of the full U-Net's), or where priced in seconds its measured time."""
        return (self.prices if self.seconds is None else self.seconds).ratios

    @property
    def genome_length(self) -> int:
        """A width per step, then where the search chooses them, a timestep per step."""
        return self.num_steps * (2 if self.searched_timesteps else 1)

    def split(self, population: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Genomes -> (widths, timesteps or None: the sampler's)."""
        population = np.asarray(population, np.int32)
        chex.assert_shape(population, (None, self.genome_length))
        if not self.searched_timesteps:
            return population, None
        return population[:, :self.num_steps], population[:, self.num_steps:]

    def genome(self, widths: np.ndarray, timesteps: np.ndarray | None = None) -> np.ndarray:
        """One genome of `widths` on `timesteps` (default: the sampler's grid)."""
        widths = np.asarray(widths, np.int32)
        if not self.searched_timesteps:
            return widths
        timesteps = self.sampler.timesteps if timesteps is None else timesteps
        return np.concatenate([widths, np.asarray(timesteps, np.int32)])

    def cost(self, population: np.ndarray) -> dict[str, np.ndarray]:
        """Each candidate's exact cost: mean MACs per step, MACs ratio and, where the search is
        priced in seconds, its predicted time ratio. (Where the search chooses the timesteps, the
        network has one stage: a width costs the same at every timestep.)"""
        population = self.split(population)[0]
        costs = [self.prices(row) for row in population]
        result = {"macs_mean": np.array([c["macs_mean"] for c in costs]),
                  "macs_ratio": np.array([c["macs_ratio"] for c in costs])}
        if self.seconds is not None:
            result["seconds_ratio"] = np.array([self.seconds(row)["macs_ratio"]
                                                for row in population])
        return result

    def __call__(self, population: np.ndarray) -> Scores:
        widths, timesteps = self.split(population)
        codes = self.population_sampler.prefix_codes(widths, timesteps)
        starts, start_states = (self.cache.lookup(codes) if self.cache is not None
                                else (None, None))
        result = self.population_sampler(
            self.params, widths, self.noise, self.key, timesteps=timesteps,
            share_prefixes=self.config.search.share_prefixes, starts=starts,
            start_states=start_states)
        if self.cache is not None:
            self.cache.add(codes, result.kept)
        samples, plan = result.samples, result.plan
        count, per_candidate = samples.shape[:2]
        features = compute_features(self.extractor, samples.reshape(-1, *samples.shape[2:]),
                                    batch_size=self.config.eval.feature_batch_size)
        features = features.reshape(count, per_candidate, -1)
        fd = np.array([self.reference.frechet_distance(f) for f in features])
        costs = self.cost(population)
        return Scores(fd, costs["macs_mean"], costs["macs_ratio"], plan.network_evaluations,
                      widths.size, costs.get("seconds_ratio"))

    def retain(self, population: np.ndarray) -> None:
        """Keeps the trajectories of `population` only (the parents of the next children)."""
        if self.cache is not None:
            self.cache.retain(self.population_sampler.prefix_codes(*self.split(population)))


TIMESTEP_CHOICES = ("fixed", "searched")


def check_timesteps_searchable(network: Network, num_timesteps: int) -> None:
    """Raises where the network cannot run `search.timesteps=searched` (the sampler is checked
    with the other settings, `search.check_settings`)."""
    if len(set(network.stages_of(np.arange(num_timesteps)).tolist())) > 1:
        raise ValueError("config.search.timesteps=searched needs one network for every timestep; "
                         "the multi-stage network ties each timestep to a stage's decoder (use "
                         "config.search.timesteps=fixed)")
