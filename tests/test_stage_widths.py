"""A width per U-Net stage (`model.stage_widths`): the branches, their cost, training, files."""

import jax
import numpy as np
import pytest

from ddsm_jax.models import stage_widths
from ddsm_jax.models.network import abstract_network, init_network
from ddsm_jax.training.sandwich import every_sandwich, sandwich_widths, sandwiches_between
from ddsm_jax.width_schedule import ScheduleError, WidthSchedule, schedule_from_json
from tests.helpers import macs_agreeing_with_xla, tiny_config

WIDTHS = (1.0, 0.75, 0.5, 0.25)


def test_neighbouring_triples_widest_first_with_the_global_widths_among_them():
    branches = stage_widths.neighbour_triples(WIDTHS)
    assert len(branches) == 4 + 3 * (2**3 - 2)  # 18 mixes of two adjacent widths
    assert len(set(branches)) == len(branches)
    assert branches[0] == 1.0 and branches[-1] == 0.25
    assert [branches[i] for i in stage_widths.global_indices(branches)] == list(WIDTHS)
    for branch in branches:
        ranks = {WIDTHS.index(w) for w in stage_widths.stage_profile(branch)}
        assert max(ranks) - min(ranks) <= 1  # neighbours only
    # Rank sums never fall along the order: index 0 the widest, each later one no wider.
    sums = [sum(WIDTHS.index(w) for w in stage_widths.stage_profile(b)) for b in branches]
    assert sums == sorted(sums)
    assert stage_widths.neighbour_triples((1.0, 0.5)) == (
        1.0, (0.5, 1.0, 1.0), (1.0, 0.5, 1.0), (1.0, 1.0, 0.5), (0.5, 0.5, 1.0), (0.5, 1.0, 0.5),
        (1.0, 0.5, 0.5), 0.5)


def test_widths_read_from_files_and_printed():
    assert stage_widths.as_width([0.5, 1, 0.5]) == (0.5, 1.0, 0.5)
    assert stage_widths.as_width((0.5, 0.5, 0.5)) == 0.5  # one branch, one spelling
    assert stage_widths.as_width(1) == 1.0
    with pytest.raises(ValueError, match="encoder, middle, decoder"):
        stage_widths.as_width([0.5, 1.0])
    assert stage_widths.width_label((0.5, 1.0, 0.25)) == "0.5/1.0/0.25"
    assert stage_widths.width_label(0.75) == "0.75"
    assert stage_widths.width_json((0.5, 1.0, 0.25)) == [0.5, 1.0, 0.25]


def test_the_network_runs_every_triple_and_the_equal_triple_is_the_global_width():
    config = tiny_config()
    config.model.stage_widths = True
    network, params = init_network(config, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda p: p + 0.03, params)  # past the zero-init outputs
    assert network.widths == stage_widths.neighbour_triples(WIDTHS)
    assert network.global_indices == [0, 7, 14, 21]
    x = jax.random.normal(jax.random.key(1), (2, *network.image_shape))
    t = np.array([3, 700])
    outputs = {w: np.asarray(network.apply(params, x, t, width=w))
               for w in (*network.widths[::3], 0.5)}
    np.testing.assert_array_equal(network.apply(params, x, t, width=(0.5, 0.5, 0.5)),
                                  outputs[0.5])
    assert all(o.shape == x.shape and np.isfinite(o).all() for o in outputs.values())
    assert len({o.tobytes() for o in outputs.values()}) == len(outputs)  # every branch its own


def test_triples_are_priced_by_the_tracer_as_xla_counts_them():
    config = tiny_config()
    config.model.stage_widths = True
    network, params = abstract_network(config)
    totals = {}
    for width in (1.0, (0.75, 1.0, 1.0), (1.0, 1.0, 0.75), (0.5, 0.25, 0.5), 0.25):
        totals[width] = macs_agreeing_with_xla(network, params, 0.005, width=width).total
    assert totals[1.0] > totals[(0.75, 1.0, 1.0)] > totals[(0.5, 0.25, 0.5)] > totals[0.25]
    assert totals[(1.0, 1.0, 0.75)] < totals[(0.75, 1.0, 1.0)]  # the decoder is the larger half


def test_the_sandwich_trains_every_triple_between_full_and_narrowest():
    branches = stage_widths.neighbour_triples(WIDTHS)
    sandwiches = every_sandwich(branches)
    assert len(sandwiches) == len(branches) - 2
    assert all(s[0] == 1.0 and s[1] == 0.25 for s in sandwiches)
    assert {s[2] for s in sandwiches} == set(branches[1:-1])
    drawn = sandwiches_between(branches, seed=0, start=0, stop=2000)
    assert set(drawn) == set(sandwiches)  # every middle is met within a run
    assert sandwich_widths(branches, 0, 5) == sandwich_widths(branches, 0, 5)
    # Plain widths are untouched: sorted, widest first, whatever the config's order.
    assert every_sandwich((0.5, 1.0, 0.25, 0.75)) == [(1.0, 0.25, 0.75), (1.0, 0.25, 0.5)]


def test_schedule_files_keep_triples_and_a_global_network_refuses_them():
    branches = stage_widths.neighbour_triples((1.0, 0.5))
    timesteps = (900, 500, 100)
    schedule = WidthSchedule(branches, (0, 3, 7), timesteps, "ddim")
    again = schedule_from_json(schedule.to_json())
    assert again.widths == branches and again.width_per_step == [1.0, (1.0, 1.0, 0.5), 0.5]
    np.testing.assert_array_equal(again.stage_widths_per_step,
                                  [[1.0, 1.0, 1.0], [1.0, 1.0, 0.5], [0.5, 0.5, 0.5]])
    np.testing.assert_array_equal(again.indices_for(branches, "ddim", timesteps), [0, 3, 7])
    with pytest.raises(ScheduleError, match="stage_widths=True"):
        again.indices_for((1.0, 0.5), "ddim", timesteps)
    # A global schedule still runs on a network with a width per stage.
    plain = WidthSchedule((1.0, 0.5), (0, 1, 1), timesteps, "ddim")
    np.testing.assert_array_equal(plain.indices_for(branches, "ddim", timesteps), [0, 7, 7])


@pytest.mark.parametrize("strategy", ["multistage", "adadiff"])
def test_other_strategies_refuse_a_width_per_stage(strategy):
    config = tiny_config()
    config.model.stage_widths = True
    config.strategy = strategy
    with pytest.raises(ValueError, match="DDSM's search space"):
        abstract_network(config)


def test_weights_trained_with_a_width_per_stage_serve_a_search_of_global_widths():
    """The option chooses which branches train and are searched, not what a branch computes, so
    it is not part of the checkpoints' identity (old checkpoints, without it, still load)."""
    from ddsm_jax.training.checkpoint import identity_differences, network_identity

    plain, staged = tiny_config(), tiny_config()
    staged.model.stage_widths = True
    assert network_identity(plain) == network_identity(staged)
    assert "stage_widths" not in network_identity(staged)["model"]
    assert identity_differences(network_identity(plain), network_identity(staged)) == []


def test_a_share_of_the_middles_can_go_to_the_global_widths():
    branches = stage_widths.neighbour_triples(WIDTHS)
    halves = [sandwich_widths(branches, 0, step, global_share=0.5)[2] for step in range(4000)]
    share = np.mean([not isinstance(w, tuple) for w in halves])
    assert 0.45 < share < 0.55 and {w for w in halves if not isinstance(w, tuple)} == {0.75, 0.5}
    alike = [sandwich_widths(branches, 0, step)[2] for step in range(4000)]
    assert 0.05 < np.mean([not isinstance(w, tuple) for w in alike]) < 0.15  # 2 of 20
    assert sandwiches_between(branches, 0, 0, 4000, global_share=0.5) != sandwiches_between(
        branches, 0, 0, 4000)
    # Plain widths draw exactly as before, whatever the share.
    assert [sandwich_widths(WIDTHS, 0, s, 0.5) for s in range(50)] == [
        sandwich_widths(WIDTHS, 0, s) for s in range(50)]
