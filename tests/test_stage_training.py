"""Multi-stage training: one stage per batch, only the encoder and that stage's decoder move."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddsm_jax.diffusion.losses import epsilon_loss
from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.cost import branch_macs
from ddsm_jax.models.network import init_network
from ddsm_jax.strategies import stage_split
from ddsm_jax.training import stage_step
from ddsm_jax.training.checkpoint import identity_differences, network_identity
from ddsm_jax.training.curriculum import Curriculum
from ddsm_jax.training.train_step import TrainState, make_optimizer
from tests.test_multi_decoder import multistage_config

BOUNDARIES = (126, 176)


def test_stages_are_drawn_as_one_uniform_timestep_and_reproducibly():
    draws = [stage_step.draw_stage(BOUNDARIES, 1000, seed=0, step=s) for s in range(4000)]
    assert draws == [stage_step.draw_stage(BOUNDARIES, 1000, seed=0, step=s) for s in range(4000)]
    counts = collections.Counter(draws)
    np.testing.assert_allclose([counts[k] / 4000 for k in range(3)], [0.126, 0.05, 0.824],
                               atol=0.02)
    choices = stage_step.choices_between(BOUNDARIES, 1000, (1.0,), 0, 0, 4000)
    assert sorted(choices) == [(0, (1.0,)), (1, (1.0,)), (2, (1.0,))]
    # With slimmable decoders the stage is the same draw, and the middle width is independent
    # of it (drawn after it from the same generator).
    widths = (1.0, 0.75, 0.5, 0.25)
    drawn = [stage_step.draw_choice(BOUNDARIES, 1000, widths, 0, s) for s in range(4000)]
    assert [stage for stage, _ in drawn] == draws
    assert {sandwich for _, sandwich in drawn} == {(1.0, 0.25, 0.75), (1.0, 0.25, 0.5)}
    noisy = [sandwich[2] for stage, sandwich in drawn if stage == 2]
    assert abs(noisy.count(0.75) / len(noisy) - 0.5) < 0.03
    assert stage_split.stage_ranges(BOUNDARIES, 1000) == ((0, 126), (126, 176), (176, 1000))
    for bad in [(176, 126), (0, 10), (10, 1000), (10, 10)]:
        with pytest.raises(ValueError, match="must increase strictly"):
            stage_split.stage_ranges(bad, 1000)


def test_the_loss_samples_timesteps_only_inside_its_range():
    diffusion = diffusion_from_config(multistage_config().diffusion)
    x0 = jnp.zeros((256, 8, 8, 1))

    def inside(low, high):  # zero error inside the range, NaN outside
        return lambda x_t, t: jnp.where(((t >= low) & (t < high))[:, None, None, None],
                                        0.0, jnp.nan) * x_t

    key = jax.random.key(0)
    assert np.isfinite(epsilon_loss(inside(126, 176), diffusion, x0, key, t_range=(126, 176)))
    assert np.isnan(epsilon_loss(inside(126, 176), diffusion, x0, key))
    full = epsilon_loss(lambda x_t, t: x_t, diffusion, x0 + 1, key)
    assert full == epsilon_loss(lambda x_t, t: x_t, diffusion, x0 + 1, key, t_range=(0, 1000))


def test_a_stage_step_moves_the_encoder_and_its_decoder_and_nothing_else():
    config = multistage_config()
    network, params = init_network(config, jax.random.key(0))
    diffusion = diffusion_from_config(config.diffusion)
    state = TrainState.create(params, make_optimizer(config.training))
    assert set(state.opt_state["decoders"]) == {0, 1, 2}
    before = jax.tree_util.tree_map(np.asarray, state)
    step = stage_step.make_stage_train_step(network, diffusion, config.training, BOUNDARIES)
    batch = jax.random.uniform(jax.random.key(1), (16, 8, 8, 1), minval=-1, maxval=1)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch, jax.random.key(2), choice=(1, (1.0,)))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 3 and metrics["loss_per_width"].shape == (1,)
    for tree in ("params", "ema_params", "opt_state"):
        new, old = getattr(state, tree), getattr(before, tree)
        for untouched in (0, 2):
            jax.tree_util.tree_map(np.testing.assert_array_equal, new["decoders"][untouched],
                                   old["decoders"][untouched])
        for moved in (new["encoder"], new["decoders"][1]):
            changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), moved,
                                             old["encoder"] if moved is new["encoder"]
                                             else old["decoders"][1])
            assert any(jax.tree_util.tree_leaves(changed)), tree
    assert all(np.isfinite(losses))


def test_a_checkpoint_knows_its_strategy():
    ddsm, staged = multistage_config(), multistage_config()
    ddsm.strategy = "ddsm"
    differences = identity_differences(network_identity(ddsm), network_identity(staged))
    assert "strategy: None in the checkpoint, 'multistage' now" in differences
    other = multistage_config(ratios=(1.0, 1.0, 0.25))
    [difference] = identity_differences(network_identity(staged), network_identity(other))
    assert difference.startswith("multistage.decoder_ratios: (1.5, 1.0, 0.25) in the checkpoint")
    # A checkpoint written before a setting existed matches the setting left empty, only.
    older = network_identity(staged)
    del older["multistage"]["decoder_widths"]
    assert identity_differences(older, network_identity(staged)) == []
    slimmable = multistage_config()
    slimmable.multistage.decoder_widths = (1.0, 0.5)
    [difference] = identity_differences(older, network_identity(slimmable))
    assert difference.startswith("multistage.decoder_widths: None in the checkpoint")


def test_slimmable_decoders_train_at_a_sandwich_of_widths_and_the_search_sees_them():
    config = multistage_config()
    config.multistage.decoder_widths = (1.0, 0.5, 0.25)
    network, params = init_network(config, jax.random.key(0))
    assert network.widths == (1.0, 0.5, 0.25) and network.num_stages == 3
    curriculum = Curriculum.of(config, network)
    assert len(curriculum.every_choice) == 3  # one sandwich (all three widths) per stage
    choice = curriculum.choice(0)
    assert choice[1] == (1.0, 0.25, 0.5)
    assert curriculum.loss_names(choice) == [f"loss_stage{choice[0]}_w{w}" for w in choice[1]]
    state = TrainState.create(params, make_optimizer(config.training))
    before = jax.tree_util.tree_map(np.asarray, state.params)
    step = stage_step.make_stage_train_step(network, diffusion_from_config(config.diffusion),
                                            config.training, BOUNDARIES)
    batch = jax.random.uniform(jax.random.key(1), (16, 8, 8, 1), minval=-1, maxval=1)
    state, metrics = step(state, batch, jax.random.key(2), choice=(2, (1.0, 0.25, 0.5)))
    losses = np.asarray(metrics["loss_per_width"])
    assert losses.shape == (3,) and np.isclose(float(metrics["loss"]), losses.sum())
    for untouched in (0, 1):
        jax.tree_util.tree_map(np.testing.assert_array_equal, state.params["decoders"][untouched],
                               before["decoders"][untouched])
    # Every (stage, width) is a branch the sampler and the search can price and run.
    assert len(network.branch_fns(state.params)) == 9
    assert branch_macs(network, state.params).shape == (3, 3)
    with pytest.raises(ValueError, match="config.multistage.decoder_widths"):
        config.multistage.decoder_widths = (1.0, 1.5)
        init_network(config, jax.random.key(0))
