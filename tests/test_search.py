"""The schedule search end to end on a tiny network: outputs, determinism, resume."""

import json

import jax
import numpy as np
import pytest

from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.network import init_network
from ddsm_jax.sampling import ScheduleSampler, sample_in_batches, stream_draws
from ddsm_jax.search import branch_seconds, surrogate
from ddsm_jax.search.search import EvolutionarySearch, SearchError
from ddsm_jax.utils.files import write_json
from ddsm_jax.width_schedule import load_schedule
from tests.helpers import tiny_config


def search_config(generations=2):
    config = tiny_config()
    config.sampling.num_steps = 6
    config.search.population_size = 8
    config.search.generations = generations
    config.search.num_samples = 16
    config.search.num_piecewise = 2
    config.search.validation_samples = 24
    config.search.validation_candidates = 3
    config.eval.num_reference = 200
    return config


@pytest.fixture(scope="module")
def model():
    config = search_config()
    network, params = init_network(config, jax.random.key(0))
    return network, diffusion_from_config(config.diffusion), params


def run_search(config, workdir, model, install_classifier):
    install_classifier(workdir)
    network, diffusion, params = model
    return EvolutionarySearch(config, workdir, network, diffusion, params, progress=False).run()


def _without_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_search_writes_its_results_and_is_deterministic(tmp_path, model, digits_classifier):
    first = run_search(search_config(), tmp_path / "a", model, digits_classifier)
    out = tmp_path / "a" / "search"
    for name in ("schedule.json", "pareto.json", "history.jsonl", "schedule.png", "pareto.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "schedule.json").read_text())
    for key in ("widths", "schedule", "timesteps", "sampler", "num_steps", "macs_mean",
                "macs_ratio", "fd"):
        assert key in saved, key
    assert load_schedule(out / "schedule.json") == first
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["generation"] for h in history] == [0, 1, 2]
    assert all(h["scored"] == 8 for h in history)  # children are never schedules seen before
    # Children only, each once, shared prefixes computed once: never more network calls than
    # evaluating every candidate from scratch. (Here 8 candidates sit on 8 devices, one each, so
    # nothing is shared; tests/test_population.py shows the saving within a device.)
    assert all(h["network_evaluations"] <= h["naive_evaluations"] for h in history)
    # Across generations children start from their parents' kept states (trajectory cache).
    assert saved["network_evaluations"] < saved["naive_network_evaluations"]
    pareto = json.loads((out / "pareto.json").read_text())
    assert [u["width"] for u in pareto["uniform"]] == [1.0, 0.75, 0.5, 0.25]
    ratios = [p["macs_ratio"] for p in pareto["front"]]
    fds = [p["fd"] for p in pareto["front"]]
    assert ratios == sorted(ratios) and fds == sorted(fds, reverse=True)

    second = run_search(search_config(), tmp_path / "b", model, digits_classifier)
    assert second == first
    history_b = [json.loads(line) for line in
                 (tmp_path / "b" / "search" / "history.jsonl").read_text().splitlines()]
    assert _without_seconds(history_b) == _without_seconds(history)


def test_resumed_search_ends_like_an_uninterrupted_one(tmp_path, model, digits_classifier):
    uninterrupted = run_search(search_config(generations=3), tmp_path / "whole", model,
                               digits_classifier)
    # Stopped after generation 1 (what a kill between generations leaves), then resumed.
    run_search(search_config(generations=1), tmp_path / "parts", model, digits_classifier)
    state_file = tmp_path / "parts" / "search" / "state.json"
    assert json.loads(state_file.read_text())["generation"] == 1
    (state_file.parent / ".state.json.tmp999").write_text("{half a file")  # a crash mid-write
    resumed = run_search(search_config(generations=3), tmp_path / "parts", model,
                         digits_classifier)
    # The same choice and scores; only the work differs: the resumed run's trajectory cache
    # starts empty, so its first generation computes its children's prefixes again. The
    # schedule says so.
    work = "network_evaluations"
    assert resumed.figures.pop(work) >= uninterrupted.figures.pop(work)
    assert resumed.figures.pop("resumed_after_generations") == [1]
    assert "resumed_after_generations" not in uninterrupted.figures
    assert resumed == uninterrupted
    changed = search_config(generations=3)
    changed.search.macs_budget = 0.3
    with pytest.raises(SearchError, match="other settings"):
        run_search(changed, tmp_path / "parts", model, digits_classifier)


def test_validation_rescores_the_shortlist_on_fresh_noise(tmp_path, model, digits_classifier):
    config = search_config()
    config.search.objective = "budget"
    config.search.macs_budget = 0.4
    chosen = run_search(config, tmp_path, model, digits_classifier)
    out = tmp_path / "search"
    state = json.loads((out / "state.json").read_text())
    width_cost = np.array([u["macs_ratio"] for u in
                           json.loads((out / "pareto.json").read_text())["uniform"]])
    # Budget repair: every schedule bred or seeded (all but the uniform baselines) fits.
    non_uniform = [k for k in state["archive"] if len(set(k.split(","))) > 1]
    assert non_uniform and all(state["archive"][k]["macs_ratio"] <= 0.4 + 1e-9
                               for k in non_uniform)
    validation = state["validation"]
    assert len(validation["shortlist"]) == 3 and 1 <= len(validation["front"]) <= 3
    uniform = {",".join([str(i)] * 6) for i in range(4)}
    assert set(validation["scores"]) == {*uniform, *validation["shortlist"], *validation["front"]}
    # The front's spread: schedules no other scored schedule beats on both FD and MACs.
    archive = state["archive"]
    for key in validation["front"]:
        assert not any(a["fd"] < archive[key]["fd"] and a["macs_ratio"] < archive[key]["macs_ratio"]
                       for a in archive.values())
    saved = json.loads((out / "schedule.json").read_text())
    assert saved["validation_samples"] == 24
    key = ",".join(str(i) for i in saved["schedule"])
    assert key in validation["scores"]
    assert saved["fd"] == validation["scores"][key]["fd"]  # chosen on the fresh scores
    assert saved["search_fd"] == state["archive"][key]["fd"] != saved["fd"]
    assert saved["macs_ratio"] <= 0.4 and width_cost[0] == 1.0
    affordable = [k for k, v in validation["scores"].items() if v["macs_ratio"] <= 0.4 + 1e-9]
    assert key == min(affordable, key=lambda k: validation["scores"][k]["fd"])
    # Other validation settings don't refuse the finished search; they redo the validation only.
    config.search.validation_samples = 16
    again = run_search(config, tmp_path, model, digits_classifier)
    state = json.loads((out / "state.json").read_text())
    assert state["validation"]["settings"]["validation_samples"] == 16
    assert state["history"] == json.loads(json.dumps(state["history"]))
    assert again.figures["validation_samples"] == 16 and chosen.figures["generations"] == 2


@pytest.mark.parametrize("objective", ["weighted", "pareto"])
def test_every_objective_runs_a_search_to_a_validated_choice(tmp_path, model, digits_classifier,
                                                             objective):
    config = search_config(generations=1)
    config.search.objective = objective
    chosen = run_search(config, tmp_path, model, digits_classifier)
    state = json.loads((tmp_path / "search" / "state.json").read_text())
    assert len(state["archive"]) == 16  # seeds and children, none scored twice
    key = ",".join(str(i) for i in chosen.schedule)
    assert key in state["validation"]["scores"]
    assert chosen.figures["objective"] == objective


def test_identical_schedules_score_identically(tmp_path, model, digits_classifier):
    config = search_config()
    digits_classifier(tmp_path)
    network, diffusion, params = model
    search = EvolutionarySearch(config, tmp_path, network, diffusion, params, progress=False)
    population = np.array([[0, 0, 1, 1, 2, 2], [3, 3, 3, 0, 0, 0], [0, 0, 1, 1, 2, 2]])
    scores = search.scorer(population)
    # On 8 devices each candidate runs on its own device: equal even across devices.
    assert scores.fd[0] == scores.fd[2] and scores.fd[0] != scores.fd[1]
    assert scores.macs_ratio[1] < scores.macs_ratio[0] < 1


def test_a_search_priced_in_seconds_uses_the_measured_branch_times(tmp_path, model,
                                                                   digits_classifier):
    """Branch times cached as if measured here, with the narrowest width the slowest: every
    price, the budget and the front follow them, not the MACs; the chosen schedule's time is
    also measured for real. A cache made at another batch size is measured again."""
    config = search_config(generations=1)
    config.search.objective = "budget"
    config.search.cost = "seconds"
    config.search.seconds_budget = 0.6
    config.search.timing_repeats = 1
    network, diffusion, params = model
    sampler = ScheduleSampler(network, diffusion, config.sampling)
    forward = np.array([1.0, 0.5, 0.3, 2.0])  # seconds per call of widths 1, 0.75, 0.5, 0.25
    cached = {"device": branch_seconds.device_name(), "batch_size": config.sampling.batch_size,
              "widths": list(network.widths), "stages": 1, "branch": "width",
              "timesteps": [int(t) for t in sampler.timesteps], "forward": [forward.tolist()],
              "step_overhead": 0.0}
    workdir = tmp_path / "run"
    write_json(workdir / "search" / "branch_seconds.json", cached)
    schedule = run_search(config, workdir, model, digits_classifier)
    state = json.loads((workdir / "search" / "state.json").read_text())
    for key, entry in state["archive"].items():
        indices = [int(i) for i in key.split(",")]
        assert entry["seconds_ratio"] == pytest.approx(forward[indices].mean())
    assert schedule.figures["seconds_ratio"] <= 0.6
    assert schedule.figures["seconds_ratio"] == pytest.approx(
        forward[list(schedule.schedule)].mean())
    assert schedule.figures["measured_seconds_ratio"] > 0 and schedule.figures["cost"] == "seconds"
    front = json.loads((workdir / "search" / "pareto.json").read_text())["front"]
    assert [p["seconds_ratio"] for p in front] == sorted(p["seconds_ratio"] for p in front)
    assert all(3 not in p["schedule"] for p in front)  # the slowest width is never worth it
    assert json.loads((workdir / "search" / "branch_seconds.json").read_text()) == cached
    # At another batch size the cache does not hold: measured again, and cached.
    config.sampling.batch_size = 4
    remeasured = branch_seconds.branch_seconds(workdir, ScheduleSampler(
        network, diffusion, config.sampling), params, 4, repeats=1)
    assert remeasured["batch_size"] == 4 and remeasured["forward"] != [forward.tolist()]
    assert np.all(np.asarray(remeasured["forward"]) > 0) and remeasured["step_overhead"] >= 0


def test_the_surrogate_ranks_schedules_by_their_steps_widths():
    """FD made of one effect per (step, width) and a little noise: fitted on 60 schedules, the
    predictions of 40 others follow the true order."""
    rng = np.random.default_rng(0)
    effects = rng.uniform(0.0, 0.3, size=(10, 4))
    def true_fd(rows):
        return np.exp(effects[np.arange(10), rows].sum(axis=1))
    scored, unseen = rng.integers(0, 4, size=(60, 10)), rng.integers(0, 4, size=(40, 10))
    noisy = true_fd(scored) * np.exp(rng.normal(0.0, 0.02, size=60))
    predicted = surrogate.predict_fd(scored, noisy, unseen, num_widths=4)
    rank = lambda a: np.argsort(np.argsort(a))
    assert np.corrcoef(rank(predicted), rank(true_fd(unseen)))[0, 1] > 0.9


def test_a_surrogate_search_samples_half_the_children(tmp_path, model, digits_classifier):
    config = search_config(generations=2)
    config.search.surrogate_keep = 0.5
    schedule = run_search(config, tmp_path, model, digits_classifier)
    history = [json.loads(line) for line in
               (tmp_path / "search" / "history.jsonl").read_text().splitlines()]
    assert [h.get("bred") for h in history] == [None, 8, 8]
    assert [h["scored"] for h in history] == [8, 4, 4]
    assert all(h["naive_evaluations"] == 8 * 6 for h in history)  # every bred child counts
    assert schedule.figures["network_evaluations"] < schedule.figures[
        "naive_network_evaluations"] * (8 + 4 + 4) / (3 * 8)


def test_a_search_of_timesteps_and_widths_runs_to_an_export_that_samples_on_them(
        tmp_path, model, digits_classifier):
    """`search.timesteps=searched`: every genome is 6 widths then 6 descending timesteps; the
    uniform widths on the config's grid are the baselines; the chosen schedule, the validated
    front and the export carry the timesteps, and sampling runs on them."""
    from ddsm_jax import export
    from ddsm_jax.eval.evaluate import evaluate

    config = search_config(generations=2)
    config.search.timesteps = "searched"
    config.search.objective = "budget"
    config.search.macs_budget = 0.5
    config.search.surrogate_keep = 0.5
    network, diffusion, params = model
    grid = ScheduleSampler(network, diffusion, config.sampling).timesteps
    schedule = run_search(config, tmp_path, model, digits_classifier)
    state = json.loads((tmp_path / "search" / "state.json").read_text())
    genomes = np.array([[int(g) for g in key.split(",")] for key in state["archive"]])
    assert genomes.shape == (16, 12) and np.all(np.diff(genomes[:, 6:], axis=1) < 0)
    for i in range(4):
        assert ",".join(map(str, [i] * 6 + grid.tolist())) in state["validation"]["scores"]
    assert len({tuple(g[6:]) for g in genomes}) > 4  # the timesteps really vary
    assert schedule.timesteps_searched and schedule.figures["macs_ratio"] <= 0.5
    assert list(schedule.timesteps) == sorted(schedule.timesteps, reverse=True)
    reloaded = load_schedule(tmp_path / "search" / "schedule.json")
    assert reloaded == schedule
    sampler = ScheduleSampler(network, diffusion, config.sampling)
    np.testing.assert_array_equal(sampler.for_schedule(schedule).timesteps, schedule.timesteps)
    with pytest.raises(ValueError, match="6 timesteps"):
        schedule.indices_for(network.widths, "ddim", grid[:5])
    # Evaluation runs the schedule on its own timesteps, priced as the search priced it.
    config.eval.num_samples = 16
    metrics = evaluate(config, tmp_path, network, diffusion, params, schedule=schedule,
                       progress=False)
    assert metrics["schedule"]["macs_ratio"] == pytest.approx(schedule.figures["macs_ratio"])
    # The export offers every validated schedule on its timesteps, and samples on them (here
    # a schedule on a grid of its own: the search's choice may be on the config's).
    validated = json.loads((tmp_path / "search" / "pareto.json").read_text())["validated"]
    assert all(len(v["timesteps"]) == 6 for v in validated)
    own = sampler.to_width_schedule([0, 0, 1, 2, 3, 3], (900, 700, 500, 300, 100, 0), fd=50.0)
    path = export.save(tmp_path / "export", config, params, own,
                       front=export.build_front(config, network, params, sampler, own, validated))
    loaded = export.load(path)
    assert loaded.choose().timesteps == (900, 700, 500, 300, 100, 0)
    assert {m.timesteps for m in loaded.front} > {None, (900, 700, 500, 300, 100, 0)}
    full = next(m for m in loaded.front if m.macs_ratio == 1.0)
    assert full.timesteps is None  # the config's grid
    images = loaded.sample(4, seed=3)
    on_own = sampler.for_schedule(own)
    direct = sample_in_batches(on_own, params, on_own.to_indices(own),
                               *stream_draws(jax.random.key(3), 4, network.image_shape),
                               batch_size=config.sampling.batch_size)
    np.testing.assert_allclose(images, direct, atol=1e-5)
    on_grid = loaded.sample(4, seed=3, schedule=np.array([0, 0, 1, 2, 3, 3]))
    assert np.abs(on_grid - images).max() > 1e-3  # the same widths on other timesteps


def test_searched_timesteps_are_refused_where_they_cannot_apply():
    from ddsm_jax.models.network import abstract_network
    from ddsm_jax.search.scorer import check_timesteps_searchable
    from ddsm_jax.search.search import check_settings
    from tests.test_multi_decoder import multistage_config

    config = search_config()
    config.search.timesteps = "searched"
    config.sampling.method = "ddpm"
    with pytest.raises(ValueError, match="sampling.method=ddim"):
        check_settings(config)
    config.search.timesteps = "sometimes"
    with pytest.raises(ValueError, match="choose one of"):
        check_settings(config)
    config = multistage_config()
    with pytest.raises(ValueError, match="multi-stage"):
        check_timesteps_searchable(abstract_network(config)[0], config.diffusion.num_timesteps)
