"""Step-Adaptive Training: group models pruned from a base model, each run at its own width."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.cost import SchedulePrices, width_macs
from ddsm_jax.models.network import init_network
from ddsm_jax.strategies import step_adaptive
from ddsm_jax.training import stage_step
from ddsm_jax.training.checkpoint import network_identity
from ddsm_jax.training.train_step import TrainState, make_optimizer
from tests.helpers import tiny_config


def grouped_config(widths=(1.0, 0.5), boundaries=(400,)):
    config = tiny_config()
    config.strategy = "step_adaptive"
    config.step_adaptive.group_widths = widths
    config.step_adaptive.boundaries = boundaries
    return config


def test_each_group_is_the_slimmable_unet_of_its_weights_at_its_width():
    config = grouped_config()
    network, params = init_network(config, jax.random.key(0))
    single, _ = init_network(step_adaptive.base_config(config), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, *network.image_shape))
    t = jax.numpy.array([10, 900])
    for group, width in enumerate((1.0, 0.5)):
        np.testing.assert_array_equal(
            network.apply(params, x, t, width=1.0, stage=group),
            single.apply(params["groups"][group], x, t, width=width))
        assert (width_macs(network, params, 1.0, stage=group).total
                == width_macs(single, params["groups"][group], width).total)
    # A sampling step runs its group's model: 0.5's MACs above timestep 400, full below.
    prices = SchedulePrices.of(network, params, [900, 500, 300, 100], config)
    half = width_macs(single, params["groups"][1], 0.5).total / prices.reference
    np.testing.assert_allclose(prices.ratios[:, 0], [half, half, 1.0, 1.0])


def test_a_group_step_moves_its_model_and_nothing_else():
    config = grouped_config()
    network, params = init_network(config, jax.random.key(0))
    state = TrainState.create(params, make_optimizer(config.training))
    before = jax.tree_util.tree_map(np.asarray, state)
    step = stage_step.make_stage_train_step(network, diffusion_from_config(config.diffusion),
                                            config.training, network.boundaries)
    batch = jax.random.uniform(jax.random.key(1), (16, 8, 8, 1), minval=-1, maxval=1)
    for _ in range(2):
        state, metrics = step(state, batch, jax.random.key(2), choice=(1, (1.0,)))
    assert np.isfinite(float(metrics["loss"]))
    for tree in ("params", "ema_params", "opt_state"):
        new, old = getattr(state, tree)["groups"], getattr(before, tree)["groups"]
        jax.tree_util.tree_map(np.testing.assert_array_equal, new[0], old[0])
        moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), new[1], old[1])
        assert any(jax.tree_util.tree_leaves(moved)), tree


def test_the_plan_groups_by_snr_meets_the_budget_and_prunes_only_where_it_helps():
    config = tiny_config()
    config.strategy = "step_adaptive"
    config.step_adaptive.macs_budget = 0.7
    config.step_adaptive.num_groups = 4
    base = step_adaptive.base_config(config)
    network, params = init_network(base, jax.random.key(0))
    diffusion = diffusion_from_config(config.diffusion)
    images = np.asarray(jax.random.uniform(jax.random.key(1), (16, 8, 8, 1), minval=-1,
                                           maxval=1))
    plan, initial = step_adaptive.plan_groups(config, network, diffusion, params, images)
    timesteps, boundaries = np.array(plan["timesteps"]), plan["boundaries"]
    assert len(boundaries) == 3 and np.all(np.diff(boundaries) > 0)
    assert set(boundaries) <= set(timesteps.tolist())  # each group starts at a sampling step
    assert plan["steps_per_group"] == np.bincount(
        np.searchsorted(boundaries, timesteps, side="right")).tolist()
    assert plan["macs_ratio"] <= 0.7
    widths, difficulty = np.array(plan["group_widths"]), np.array(plan["difficulty"])
    hardest_first = np.argsort(-difficulty)
    assert np.all(np.diff(widths[hardest_first]) <= 0)  # a harder group is never narrower
    probe = plan["probe"]
    assert np.allclose(difficulty, probe["loss_full_width"])
    for group, ordering in enumerate(plan["ordering"]):
        kept = initial[group]
        if ordering == "none":
            assert kept is not None and probe["loss_at_width_ordered"][group] >= \
                probe["loss_at_width_unordered"][group]
            jax.tree_util.tree_map(np.testing.assert_array_equal, kept, jax.device_get(params))
        else:
            assert probe["loss_at_width_ordered"][group] < probe["loss_at_width_unordered"][group]
    # The grouped network of this plan costs what the plan says.
    grouped = step_adaptive.grouped_config(config, plan)
    grouped_network, grouped_params = init_network(grouped, jax.random.key(0))
    prices = SchedulePrices.of(grouped_network, grouped_params, timesteps, grouped)
    np.testing.assert_allclose(prices([0] * len(timesteps))["macs_ratio"], plan["macs_ratio"])


def test_the_base_model_is_the_plain_unet_run():
    config = tiny_config()
    config.strategy = "step_adaptive"
    plain = tiny_config()
    plain.model.widths = (1.0,)
    assert network_identity(step_adaptive.base_config(config)) == network_identity(plain)
    grouped = step_adaptive.grouped_config(config, {"boundaries": [400],
                                                    "group_widths": [1.0, 0.5]})
    assert grouped.training.num_steps == config.step_adaptive.finetune_steps
    assert grouped.step_adaptive.base_steps == config.training.num_steps


@pytest.mark.parametrize("change,fragment", [
    ({"difficulty": "entropy"}, "step_adaptive.difficulty='entropy'"),
    ({"group_widths": (1.0, 0.5)}, "give step_adaptive.boundaries and"),
    ({"finetune_steps": 0}, "at least 1")])
def test_a_bad_setting_is_a_clear_error(change, fragment):
    config = tiny_config()
    config.strategy = "step_adaptive"
    config.step_adaptive.update(change)
    with pytest.raises(ValueError, match=fragment):
        step_adaptive.check_config(config)


def test_a_workdir_without_its_plan_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run --mode=train first"):
        step_adaptive.resolve(tiny_config(), tmp_path)
