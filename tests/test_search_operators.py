"""Genetic operators and objectives of the schedule search (pure numpy, fast)."""

import dataclasses

import numpy as np
import pytest

from ddsm_jax.search import genome, objectives


def test_initial_population_holds_the_uniform_schedules_and_no_duplicates():
    rng = np.random.default_rng(0)
    population = genome.initial_population(rng, 20, num_widths=4, num_steps=30, num_piecewise=6)
    assert population.shape == (20, 30) and population.dtype == np.int32
    np.testing.assert_array_equal(population[:4], genome.uniform_schedules(range(4), 30))
    assert len({row.tobytes() for row in population}) == 20
    staircases = population[4:10]
    assert all(np.count_nonzero(np.diff(row)) <= 3 for row in staircases)
    narrowing = [np.all(np.diff(row) >= 0) for row in staircases]
    widening = [np.all(np.diff(row) <= 0) for row in staircases]
    assert all(n or w for n, w in zip(narrowing, widening, strict=True))
    assert any(n and not w for n, w in zip(narrowing, widening, strict=True))
    assert any(w and not n for n, w in zip(narrowing, widening, strict=True))
    again = genome.initial_population(np.random.default_rng(0), 20, 4, 30, 6)
    np.testing.assert_array_equal(population, again)


def test_fit_budget_narrows_until_the_schedule_is_affordable():
    width_cost = np.array([1.0, 0.57, 0.26, 0.07])
    rng = np.random.default_rng(3)
    for _ in range(20):
        row = rng.integers(0, 4, size=30).astype(np.int32)
        fitted = genome.fit_budget(rng, row, width_cost, budget=0.3)
        assert width_cost[fitted].mean() <= 0.3
        assert np.all(fitted >= row)  # only ever narrower
        # already affordable: untouched
        np.testing.assert_array_equal(genome.fit_budget(rng, fitted, width_cost, 0.3), fitted)
    repair = lambda row: genome.fit_budget(rng, row, width_cost, 0.5)
    population = genome.initial_population(rng, 16, 4, 30, 6, repair=repair)
    np.testing.assert_array_equal(population[:4], genome.uniform_schedules(range(4), 30))
    assert all(width_cost[row].mean() <= 0.5 for row in population[4:])
    assert len({row.tobytes() for row in population}) == 16


def test_crossover_swaps_whole_runs_between_cut_points():
    ops = genome.Operators(num_widths=4, num_steps=40, crossover_rate=1.0, max_cut_points=3)
    a, b = np.zeros(40, np.int32), np.full(40, 3, np.int32)
    rng = np.random.default_rng(1)
    for _ in range(50):
        child = genome.crossover(rng, ops, a, b)
        assert set(np.unique(child)) <= {0, 3}
        switches = np.count_nonzero(np.diff(child))
        assert 1 <= switches <= 3 and child[0] == 0  # starts from parent a
    no_cross = genome.Operators(4, 40, crossover_rate=0.0)
    np.testing.assert_array_equal(genome.crossover(rng, no_cross, a, b), a)


def test_mutation_really_moves_the_search():
    ops = genome.Operators(num_widths=4, num_steps=50)
    rng = np.random.default_rng(2)
    parent = np.repeat(np.array([2, 0], np.int32), 25)
    children = [genome.mutate(rng, ops, parent) for _ in range(200)]
    changed = [c for c in children if not np.array_equal(c, parent)]
    assert len(changed) > 120  # most children differ from their parent (the release: ~none)
    assert all(c.min() >= 0 and c.max() <= 3 for c in children)
    # Every width value gets reached from a two-width parent (block mutation repaints).
    assert set(np.unique(np.concatenate(children))) == {0, 1, 2, 3}
    # Moved boundaries: some children keep two runs but with the edge elsewhere.
    edges = {int(np.flatnonzero(np.diff(c))[0]) for c in changed
             if np.count_nonzero(np.diff(c)) == 1 and set(np.unique(c)) == {0, 2}}
    assert len(edges) > 3


def test_unique_rows_replaces_duplicates_and_seen_schedules():
    rng = np.random.default_rng(3)
    rows = np.zeros((5, 10), np.int32)
    seen = {np.ones(10, np.int32).tobytes()}
    unique = genome.unique_rows(np.concatenate([rows, np.ones((1, 10), np.int32)]), rng, 3, seen)
    keys = [row.tobytes() for row in unique]
    assert len(set(keys)) == 6 and np.ones(10, np.int32).tobytes() not in keys


def test_pareto_ranks_and_crowding():
    fd = np.array([1.0, 2.0, 3.0, 2.5, 1.5, 3.0])
    cost = np.array([3.0, 2.0, 1.0, 2.5, 3.5, 3.0])
    # 0, 1, 2 are the front; 3 is dominated by 1; 4 by 0; 5 by 0, 1 and 3 (rank 2).
    np.testing.assert_array_equal(objectives.pareto_ranks(fd, cost), [0, 0, 0, 1, 1, 2])
    crowd = objectives.crowding_distance(fd[:3], cost[:3])
    assert np.isinf(crowd[0]) and np.isinf(crowd[2]) and np.isfinite(crowd[1])


@pytest.mark.parametrize("objective", objectives.OBJECTIVES)
def test_rankings_agree_with_their_definitions(objective):
    fd = np.array([5.0, 4.0, 6.0, 3.0])
    macs_mean = np.array([100.0, 80.0, 20.0, 90.0]) * 1e6
    ratio = macs_mean / 100e6
    order = objectives.ranking(objective, fd, macs_mean, ratio, macs_lambda=0.05,
                               macs_budget=0.85)
    if objective == "weighted":  # fd + 0.05 * MMACs: 10, 8, 7, 7.5
        np.testing.assert_array_equal(order, [2, 3, 1, 0])
    elif objective == "budget":  # feasible (<= 0.85): 1 (fd 4), 2 (fd 6); then 3 (0.05 over), 0
        np.testing.assert_array_equal(order, [1, 2, 3, 0])
    else:  # front: 3, 1, 2 (0 is dominated by 3)
        assert set(order[:3]) == {1, 2, 3} and order[3] == 0


def test_choose_for_pareto_takes_the_cheapest_schedule_within_tolerance():
    fd = np.array([10.0, 10.4, 10.6, 20.0])
    ratio = np.array([1.0, 0.5, 0.3, 0.1])
    chosen = objectives.choose("pareto", fd, ratio * 100, ratio, full_fd=10.0, fd_tolerance=0.05)
    assert chosen == 1
    assert objectives.choose("pareto", fd, ratio, ratio, full_fd=1.0, fd_tolerance=0.05) == 0
    with pytest.raises(ValueError, match="unknown search objective"):
        objectives.ranking("fastest", fd, ratio, ratio)


def test_shortlist_takes_the_best_or_the_front_around_the_choice():
    fd = np.array([10.0, 10.4, 10.6, 20.0, 12.0, 11.0, 10.5])
    ratio = np.array([1.0, 0.5, 0.3, 0.1, 0.6, 0.45, 0.35])
    budget = objectives.shortlist("budget", fd, ratio, ratio, 3, full_fd=10.0, fd_tolerance=0.05,
                                  macs_budget=0.5)
    np.testing.assert_array_equal(budget, [1, 6, 2])  # feasible, best FD first
    # Front by cost: 3 (0.1), 2 (0.3), 6 (0.35), 1 (0.5), 0 (1.0); 4 and 5 are dominated by 6.
    # The choice is 6, the cheapest within 5% of full width's 10.0; its neighbours come along.
    front = objectives.shortlist("pareto", fd, ratio, ratio, 3, full_fd=10.0, fd_tolerance=0.05)
    np.testing.assert_array_equal(front, [2, 6, 1])
    assert len(objectives.shortlist("pareto", fd, ratio, ratio, 10, full_fd=10.0,
                                    fd_tolerance=0.05)) == 5


def _space(num_widths=4, num_steps=10, num_timesteps=1000):
    ops = genome.Operators(num_widths=num_widths, num_steps=num_steps)
    grid = np.arange(0, num_timesteps, num_timesteps // num_steps)[::-1]
    return genome.GenomeSpace(ops, grid, num_timesteps)


def _valid_timesteps(timesteps, num_timesteps=1000):
    return (np.all(np.diff(timesteps) < 0) and timesteps.min() >= 0
            and timesteps.max() < num_timesteps)


def test_descending_timesteps_repairs_to_distinct_descending_steps_in_range():
    for raw in ([5, 5, 5, 5], [-3, 2000, 7, 7], [0, 0, 0, 0], [999, 999, 998, 1]):
        fixed = genome.descending_timesteps(np.array(raw), 1000)
        assert _valid_timesteps(fixed), (raw, fixed)
    np.testing.assert_array_equal(genome.descending_timesteps(np.array([3, 9, 1]), 10), [9, 3, 1])
    np.testing.assert_array_equal(genome.descending_timesteps(np.array([0, 0, 0]), 10), [2, 1, 0])


def test_joint_genomes_stay_valid_under_every_operator():
    space, rng = _space(), np.random.default_rng(0)
    population = space.initial_population(rng, 16, num_piecewise=6)
    assert population.shape == (16, 20) and len({r.tobytes() for r in population}) == 16
    for i in range(4):  # the uniform widths on the sampler's grid: the baselines
        np.testing.assert_array_equal(population[i], np.concatenate([np.full(10, i), space.grid]))
    moved = 0
    for _ in range(300):
        a, b = population[rng.integers(16, size=2)]
        child = space.mutate(rng, space.crossover(rng, a, b))
        widths, timesteps = space.split(child)
        assert _valid_timesteps(timesteps) and widths.min() >= 0 and widths.max() < 4
        moved += not np.isin(timesteps, np.concatenate([space.split(a)[1],
                                                         space.split(b)[1]])).all()
    assert moved > 100  # the timesteps really are searched


def test_joint_crossover_inherits_whole_steps():
    space = _space()
    ops = dataclasses.replace(space.ops, crossover_rate=1.0)
    space = dataclasses.replace(space, ops=ops)
    rng = np.random.default_rng(1)
    a = space.join(np.zeros(10, np.int32), np.arange(900, -1, -100))
    b = space.join(np.full(10, 3, np.int32), np.arange(950, 49, -100))
    for _ in range(50):
        widths, timesteps = space.split(space.crossover(rng, a, b))
        from_b = widths == 3  # a step taken from b brings its timestep with it
        np.testing.assert_array_equal(timesteps[from_b], space.split(b)[1][from_b])
        np.testing.assert_array_equal(timesteps[~from_b], space.split(a)[1][~from_b])
