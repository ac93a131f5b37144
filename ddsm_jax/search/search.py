"""`--mode=search`: evolve per-step width schedules, checkpointed after every generation.

(mu + lambda) evolution: each generation breeds as many children as the population holds
(tournaments on the objective's ranking, run crossover, mutation), scores only children never
seen before (an archive remembers every score: with common noise a schedule's FD never changes),
and keeps the best of parents and children. The state after each generation is one JSON file
written atomically, so a killed search resumes where it stopped and ends as an uninterrupted
one would.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

import ml_collections
import numpy as np
from tqdm import tqdm

from ddsm_jax.common_types import Params, PathLike
from ddsm_jax.diffusion.schedules import Diffusion
from ddsm_jax.layout import Stream, Workdir
from ddsm_jax.models.network import Network
from ddsm_jax.provenance import describe_weights
from ddsm_jax.search import branch_seconds, genome, objectives, surrogate
from ddsm_jax.search.plots import save_pareto_plot, save_schedule_plot
from ddsm_jax.search.scorer import TIMESTEP_CHOICES, ScheduleScorer
from ddsm_jax.utils.files import read_json, write_json, write_text_atomically
from ddsm_jax.width_schedule import WidthSchedule


class SearchError(ValueError):
    """A search state that belongs to another search (config or network changed)."""


@dataclasses.dataclass
class SearchState:
    generation: int  # generations finished; 0 = the initial population is scored
    population: list[list[int]]
    archive: dict[str, dict[str, float]]  # schedule key -> fd, macs_mean, macs_ratio
    rng_state: dict[str, Any]
    history: list[dict[str, Any]]
    fingerprint: dict[str, Any]
    # {"settings", "shortlist": [keys], "front": [keys], "scores": {key -> fd, macs_mean,
    # macs_ratio}}: the scores on the validation noise of every uniform width, the objective's
    # shortlist and a spread of the front (the schedules an export offers at each price)
    validation: dict[str, Any] | None = None
    # `weights_id` of the weights searched; a state made for other weights is searched again
    weights: dict[str, Any] | None = None
    # generations after which a run was resumed: each resume starts with an empty trajectory
    # cache, so its network evaluations differ from an uninterrupted search's
    resumed_after: list[int] = dataclasses.field(default_factory=list)


VALIDATION_SETTINGS = ("validation_samples", "validation_candidates", "validation_front")
SECONDS_SETTINGS = ("cost", "seconds_budget", "timing_repeats")
NEUTRAL_SETTINGS = {"surrogate_keep": 1.0, "timesteps": "fixed"}
COSTS = ("macs", "seconds")


def check_settings(config: ml_collections.ConfigDict) -> None:
    """Raises on `config.search` settings no search can run with: checked before a `--mode=all`
    run trains, so that it fails in seconds and writes nothing."""
    search = config.search
    if search.objective not in objectives.OBJECTIVES:
        raise ValueError(f"config.search.objective={search.objective!r}: choose one of "
                         f"{objectives.OBJECTIVES}")
    if search.validation_samples and search.validation_candidates < 1:
        raise ValueError("config.search.validation_candidates must be at least 1 (or set "
                         "config.search.validation_samples=0 to choose on the search noise)")
    if not 0.0 < search.get("surrogate_keep", 1.0) <= 1.0:
        raise ValueError(f"config.search.surrogate_keep={search.surrogate_keep} must lie "
                         f"in (0, 1]: the fraction of children sampled (1: all)")
    timesteps = search.get("timesteps", "fixed")
    if timesteps not in TIMESTEP_CHOICES:
        raise ValueError(f"config.search.timesteps={timesteps!r}: choose one of "
                         f"{TIMESTEP_CHOICES} (searched: the DDIM timesteps are chosen "
                         f"with the widths)")
    if timesteps == "searched" and config.sampling.method != "ddim":
        raise ValueError(f"config.search.timesteps=searched chooses DDIM's timesteps; the config "
                         f"samples with {config.sampling.method} (set "
                         f"--config.sampling.method=ddim)")
    if search.get("cost", "macs") not in COSTS:
        raise ValueError(f"config.search.cost={search.cost!r}: choose one of {COSTS}")
    if search.get("cost", "macs") == "seconds" and search.objective == "weighted":
        raise ValueError("config.search.cost=seconds prices the budget and pareto objectives; "
                         "the weighted one is DDSM's FD + lambda x MMACs: set "
                         "config.search.objective=budget or pareto")


def _key(schedule: np.ndarray) -> str:
    return ",".join(str(int(i)) for i in schedule)


def _unkey(key: str) -> np.ndarray:
    return np.array([int(i) for i in key.split(",")], np.int32)


class EvolutionarySearch:
    def __init__(self, config: ml_collections.ConfigDict, workdir: PathLike, network: Network,
                 diffusion: Diffusion, params: Params, *, progress: bool = True,
                 weights: dict[str, Any] | None = None):
        """`weights`: `weights_id` of `params`, recorded in every file the search writes."""
        self.config = config
        self.weights = weights
        self.search = config.search
        self.layout = Workdir(workdir)
        self.progress = progress
        check_settings(config)
        uniform = network.global_indices
        if self.search.population_size < len(uniform) + 2:
            raise ValueError(f"config.search.population_size={self.search.population_size} must "
                             f"hold the {len(uniform)} uniform schedules and at least two more")
        self.cost = self.search.get("cost", "macs")
        self.scorer = ScheduleScorer(config, workdir, network, diffusion, params,
                                     progress=progress)
        self.measured_seconds = None
        if self.cost == "seconds":
            self.measured_seconds = branch_seconds.branch_seconds(
                workdir, self.scorer.sampler, params, config.sampling.batch_size,
                self.search.timing_repeats)
            self.scorer.seconds = branch_seconds.seconds_prices(self.measured_seconds,
                                                                self.scorer.sampler)
        self.ops = genome.Operators(
            self.scorer.num_widths, self.scorer.num_steps,
            crossover_rate=self.search.crossover_rate, max_cut_points=self.search.max_cut_points,
            gene_mutation_rate=self.search.gene_mutation_rate,
            block_mutation_rate=self.search.block_mutation_rate,
            shift_mutation_rate=self.search.shift_mutation_rate,
            uniform=tuple(uniform) if len(uniform) < len(network.widths) else None)
        # The genomes: widths, or where the timesteps are searched too, widths then timesteps.
        self.space = genome.GenomeSpace(
            self.ops, self.scorer.sampler.timesteps if self.scorer.searched_timesteps else None,
            diffusion.num_timesteps)
        # Everything that changes the evolution, except the number of generations: a finished
        # search can be extended by asking for more (validation is redone when it changes).
        # Settings at their neutral value are left out, as older states never had them; a
        # MACs-priced search leaves out the seconds settings.
        ignored = ("generations", "trajectory_cache_mb", *VALIDATION_SETTINGS,
                   *(SECONDS_SETTINGS if self.cost == "macs" else ("timing_repeats",)))
        settings = {k: v for k, v in self.search.to_dict().items()
                    if k not in ignored and NEUTRAL_SETTINGS.get(k, object()) != v}
        self.fingerprint = {"search": settings, "seed": config.seed,
                            "sampling": config.sampling.to_dict(),
                            "widths": list(network.widths), "data": config.data.name}
        if self.measured_seconds is not None:  # its prices hold on the device they came from
            self.fingerprint["seconds_measured_on"] = self.measured_seconds["device"]

    # -- ranking ---------------------------------------------------------------------------
    @property
    def _cost_ratio(self) -> str:
        """The archive field the objective prices a schedule by."""
        return "seconds_ratio" if self.cost == "seconds" else "macs_ratio"

    @property
    def _budget(self) -> float:
        return self.search.seconds_budget if self.cost == "seconds" else self.search.macs_budget

    def _columns(self, keys: list[str], archive: dict) -> tuple[np.ndarray, ...]:
        """(FD, mean MACs, cost ratio: of MACs or of measured seconds, as `search.cost` says)."""
        return tuple(np.array([archive[k][name] for k in keys])
                     for name in ("fd", "macs_mean", self._cost_ratio))

    def _ranking(self, keys: list[str], archive: dict) -> np.ndarray:
        return objectives.ranking(self.search.objective, *self._columns(keys, archive),
                                  macs_lambda=self.search.macs_lambda, macs_budget=self._budget)

    # -- one generation --------------------------------------------------------------------
    def _score_new(self, population: np.ndarray, archive: dict,
                   bred: int | None = None) -> dict[str, Any]:
        """Scores the rows of `population` not in `archive`; `bred`: the children bred, where
        the surrogate sampled only `population` of them (the naive count scores them all)."""
        start = time.perf_counter()
        new = [row for row in population if _key(row) not in archive]
        network_calls = 0
        if new:
            scores = self.scorer(np.stack(new))
            network_calls = scores.network_evaluations
            for i, row in enumerate(new):
                archive[_key(row)] = scores.entry(i)
        bred = len(population) if bred is None else bred
        return {"scored": len(new), "network_evaluations": network_calls,
                **({"bred": bred} if bred != len(population) else {}),
                "naive_evaluations": bred * self.ops.num_steps,  # all from scratch
                "seconds": round(time.perf_counter() - start, 2)}

    def _surrogate_pick(self, children: np.ndarray, archive: dict) -> np.ndarray:
        """The `search.surrogate_keep` fraction of `children` the objective ranks best with
        their FD predicted from the archive (their costs are exact)."""
        keep = self.search.get("surrogate_keep", 1.0)
        if keep >= 1.0:
            return children
        keys = list(archive)
        predicted = surrogate.predict_fd(np.stack([_unkey(k) for k in keys]),
                                         np.array([archive[k]["fd"] for k in keys]), children,
                                         self.ops.num_widths, num_steps=self.ops.num_steps,
                                         num_timesteps=self.scorer.sampler.diffusion.num_timesteps)
        costs = self.scorer.cost(children)
        order = objectives.ranking(self.search.objective, predicted, costs["macs_mean"],
                                   costs[self._cost_ratio], macs_lambda=self.search.macs_lambda,
                                   macs_budget=self._budget)
        count = max(1, round(keep * len(children)))
        return children[np.sort(order[:count])]

    def _breed(self, rng: np.random.Generator, population: np.ndarray,
               archive: dict) -> np.ndarray:
        keys = [_key(row) for row in population]
        position = np.empty(len(keys), int)
        position[self._ranking(keys, archive)] = np.arange(len(keys))

        def tournament() -> np.ndarray:
            contenders = rng.choice(len(population), size=self.search.tournament_size,
                                    replace=False)
            return population[contenders[np.argmin(position[contenders])]]

        children = [self.space.mutate(rng, self.space.crossover(rng, tournament(), tournament()))
                    for _ in range(len(population))]
        seen = {_unkey(key).tobytes() for key in archive}  # never score a schedule twice
        repair = self._repair(rng)
        children = [repair(child) for child in children]
        return genome.unique_rows(np.stack(children), rng, self.ops.num_widths, seen=seen,
                                  repair=repair, space=self.space)

    def _repair(self, rng: np.random.Generator) -> genome.Repair:
        """Under a hard budget, over-budget children are narrowed into it (constraint repair)."""
        if self.search.objective != "budget":
            return genome.no_repair
        width_cost, budget, steps = self.scorer.width_cost, self._budget, self.ops.num_steps
        # Only the widths are narrowed (the genome's first `steps` genes; any timesteps follow).
        return lambda row: np.concatenate([genome.fit_budget(rng, row[:steps], width_cost, budget),
                                           row[steps:]]).astype(np.int32)

    def _record(self, generation: int, population: np.ndarray, archive: dict,
                work: dict[str, Any]) -> dict[str, Any]:
        keys = [_key(row) for row in population]
        fd, macs_mean, cost_ratio = self._columns(keys, archive)
        best = int(self._ranking(keys, archive)[0])
        fitness = objectives.fitness(self.search.objective, fd, macs_mean, cost_ratio,
                                     macs_lambda=self.search.macs_lambda, macs_budget=self._budget)
        all_keys = list(archive)
        front = objectives.pareto_ranks(*self._columns(all_keys, archive)[::2]) == 0
        best_entry = archive[keys[best]]
        return {"generation": generation, "best_fitness": float(fitness[best]),
                "best_fd": float(fd[best]), "best_macs_ratio": best_entry["macs_ratio"],
                **({"best_seconds_ratio": best_entry["seconds_ratio"]}
                   if "seconds_ratio" in best_entry else {}),
                "front_size": int(front.sum()), "archive_size": len(archive), **work}

    # -- state -----------------------------------------------------------------------------
    def _load_state(self) -> SearchState | None:
        path = self.layout.search_state
        if not path.is_file():
            return None
        try:
            state = SearchState(**read_json(path))
        except (ValueError, TypeError) as error:
            raise SearchError(f"{path} is not a search state ({error}); delete it to start the "
                              f"search again") from error
        if self.weights is not None and state.weights != self.weights:
            print(f"{path} was made for {describe_weights(state.weights)}; searching again for "
                  f"{describe_weights(self.weights)}", file=sys.stderr, flush=True)
            return None
        if state.fingerprint != json.loads(json.dumps(self.fingerprint)):
            raise SearchError(f"{path} belongs to a search with other settings (config.search, "
                              f"sampling, seed or widths changed); delete {self.layout.search} or use "
                              f"another --workdir")
        return state

    def _save_state(self, state: SearchState) -> None:
        write_json(self.layout.search_state, dataclasses.asdict(state), indent=None)
        write_text_atomically(self.layout.search_history,
                      "".join(json.dumps(h) + "\n" for h in state.history))

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> WidthSchedule:
        """Generation 0 scores the seeds; each further generation scores its children."""
        state = self._load_state()
        if state is None:
            rng = np.random.default_rng([self.config.seed, int(Stream.SEARCH)])
            population = self.space.initial_population(
                rng, self.search.population_size, self.search.num_piecewise,
                repair=self._repair(rng))
            archive: dict[str, dict[str, float]] = {}
            if self.progress:
                print(f"search: scoring {len(population)} seed schedules on "
                      f"{self.search.num_samples} samples", flush=True)
            work = self._score_new(population, archive)
            state = SearchState(0, population.tolist(), archive, rng.bit_generator.state,
                                [self._record(0, population, archive, work)], self.fingerprint,
                                weights=self.weights)
            self._save_state(state)
        elif state.generation < self.search.generations:
            state.resumed_after.append(state.generation)
        # The bar starts after the seeds are scored, so that its rate leaves compilation out.
        bar = tqdm(total=self.search.generations + 1, initial=state.generation + 1,
                   unit="generation", desc="search", disable=not self.progress)
        self._show(bar, state)
        while state.generation < self.search.generations:
            rng = np.random.default_rng()
            rng.bit_generator.state = state.rng_state
            population = np.asarray(state.population, np.int32)
            bred = self._breed(rng, population, state.archive)
            children = self._surrogate_pick(bred, state.archive)
            work = self._score_new(children, state.archive, bred=len(bred))
            merged = np.concatenate([population, children])
            keys = [_key(row) for row in merged]
            survivors = merged[self._ranking(keys, state.archive)[:len(population)]]
            self.scorer.retain(survivors)
            state.generation += 1
            state.population = survivors.tolist()
            state.rng_state = rng.bit_generator.state
            state.history.append(self._record(state.generation, survivors, state.archive, work))
            self._save_state(state)
            bar.update(1)
            self._show(bar, state)
        bar.close()
        self._validate(state)
        return self._finish(state)

    @staticmethod
    def _show(bar: tqdm, state: SearchState) -> None:
        last = state.history[-1]
        bar.set_postfix(best=f"{last['best_fitness']:.4g}", fd=f"{last['best_fd']:.4g}",
                        macs=f"{last['best_macs_ratio']:.2f}")

    def _validate(self, state: SearchState) -> None:
        """Scores the objective's shortlist, a spread of the front and every uniform width again
        on fresh noise with more samples; the winner's curse of the search noise does not carry
        over to those scores."""
        settings = {k: self.search[k] for k in VALIDATION_SETTINGS}
        if not settings["validation_samples"]:
            state.validation = None
            return
        keys = list(state.archive)
        fd, macs_mean, cost_ratio = self._columns(keys, state.archive)
        shortlist = [keys[i] for i in objectives.shortlist(
            self.search.objective, fd, macs_mean, cost_ratio,
            settings["validation_candidates"], full_fd=self._full_fd(state.archive),
            fd_tolerance=self.search.fd_tolerance, macs_lambda=self.search.macs_lambda,
            macs_budget=self._budget)]
        front = [keys[i] for i in objectives.spread_front(fd, cost_ratio,
                                                          settings["validation_front"])]
        uniform = [self._uniform_key(i) for i in self.ops.uniform_widths]
        wanted = list(dict.fromkeys([*uniform, *shortlist, *front]))  # full width first
        if (state.validation is not None and state.validation["settings"] == settings
                and list(state.validation["scores"]) == wanted):
            return
        # All of them in one call, always: a score must not depend on what was cached before.
        if self.progress:
            print(f"validating {len(wanted)} schedules on {settings['validation_samples']} "
                  f"fresh samples", flush=True)
        scorer = self.scorer.on_noise(settings["validation_samples"], Stream.VALIDATION)
        scores = scorer(np.stack([_unkey(key) for key in wanted]))
        state.validation = {"settings": settings, "shortlist": shortlist, "front": front,
                            "scores": {key: scores.entry(i) for i, key in enumerate(wanted)}}
        self._save_state(state)

    def _uniform_key(self, width_index: int) -> str:
        """Width `width_index` at every step of the sampler's grid."""
        return _key(self.scorer.genome(np.full(self.ops.num_steps, width_index)))

    def _full_key(self) -> str:
        return self._uniform_key(0)

    def _schedule_json(self, key: str) -> dict[str, list[int]]:
        """A genome as pareto.json's fields: `schedule` (widths), and `timesteps` if searched."""
        widths, timesteps = self.scorer.split(_unkey(key)[None])
        return {"schedule": widths[0].tolist(),
                **({"timesteps": timesteps[0].tolist()} if timesteps is not None else {})}

    def _full_fd(self, scores: dict) -> float:
        return scores[self._full_key()]["fd"]

    def _seconds_figures(self, key: str, archive: dict) -> dict[str, Any]:
        """Where priced in seconds: the cost, the predicted time ratio, and the one measured
        with the real sampler (alternating with full compute), the check on the prediction."""
        if self.measured_seconds is None:
            return {}
        widths, timesteps = self.scorer.split(_unkey(key)[None])
        sampler = self.scorer.sampler.with_timesteps(None if timesteps is None else timesteps[0])
        measured = branch_seconds.measured_ratio(
            sampler, self.scorer.params, widths[0], self.config.sampling.batch_size,
            self.search.timing_repeats)
        return {"cost": "seconds", "seconds_ratio": archive[key]["seconds_ratio"],
                "measured_seconds_ratio": round(measured, 4),
                "seconds_measured_on": self.measured_seconds["device"]}

    def _finish(self, state: SearchState) -> WidthSchedule:
        """schedule.json, pareto.json and the two pictures, from every schedule ever scored.
        The choice is made among the validated schedules, on their validation scores, when
        there are any."""
        keys = list(state.archive)
        fd, _, cost_ratio = self._columns(keys, state.archive)
        final = state.validation["scores"] if state.validation else state.archive
        final_keys = list(final)
        final_fd, final_macs_mean, final_cost_ratio = self._columns(final_keys, final)
        full_fd = self._full_fd(final)
        chosen_key = final_keys[objectives.choose(
            self.search.objective, final_fd, final_macs_mean, final_cost_ratio, full_fd=full_fd,
            fd_tolerance=self.search.fd_tolerance, macs_lambda=self.search.macs_lambda,
            macs_budget=self._budget)]
        chosen = keys.index(chosen_key)
        network_calls = sum(h["network_evaluations"] for h in state.history)
        naive_calls = sum(h["naive_evaluations"] for h in state.history)
        validation = ({"validation_samples": int(self.search.validation_samples),
                       "search_fd": float(fd[chosen]),
                       "search_full_fd": self._full_fd(state.archive)}
                      if state.validation else {})
        widths, timesteps = self.scorer.split(_unkey(chosen_key)[None])
        schedule = self.scorer.sampler.to_width_schedule(
            widths[0], None if timesteps is None else timesteps[0],
            macs_mean=state.archive[chosen_key]["macs_mean"],
            macs_ratio=state.archive[chosen_key]["macs_ratio"], **self._seconds_figures(
                chosen_key, state.archive), fd=final[chosen_key]["fd"], full_fd=full_fd,
            objective=self.search.objective, generations=state.generation,
            search_samples=int(self.search.num_samples), **validation,
            network_evaluations=network_calls, naive_network_evaluations=naive_calls,
            features=self.scorer.extractor.name, weights=self.weights,
            **({"resumed_after_generations": state.resumed_after} if state.resumed_after else {}))
        schedule.save(self.layout.schedule)
        front = np.flatnonzero(objectives.pareto_ranks(fd, cost_ratio) == 0)
        front = front[np.argsort(cost_ratio[front])]
        widths = self.scorer.sampler.network.widths
        uniform = [{"width": widths[i], **state.archive[self._uniform_key(i)]}
                   for i in self.ops.uniform_widths]
        pareto = {"weights": self.weights,
                  "front": [{**self._schedule_json(keys[i]), **state.archive[keys[i]]}
                            for i in front],
                  "uniform": uniform,
                  "chosen": {**self._schedule_json(chosen_key), **state.archive[chosen_key]},
                  "validated": [{**self._schedule_json(key), **scores,
                                 "search_fd": state.archive[key]["fd"]}
                                for key, scores in final.items()] if state.validation else []}
        write_json(self.layout.pareto, pareto)
        save_schedule_plot(schedule, self.layout.search / "schedule.png")
        title = f"{len(keys)} schedules scored on the same {self.search.num_samples} samples"
        if state.validation:
            title += (f";\n{len(final_keys)} of them (the shortlist, a spread of the front, the "
                      f"uniform widths)\nscored again on {self.search.validation_samples} fresh ones")
        save_pareto_plot(fd, cost_ratio, front, uniform, chosen, self.layout.search / "pareto.png",
                         num_samples=self.search.num_samples, title=title, cost=self._cost_ratio)
        return schedule
