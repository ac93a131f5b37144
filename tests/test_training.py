import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddsm_jax.data.pipeline import load_dataset
from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.network import init_network
from ddsm_jax.training.sandwich import sandwich_widths
from ddsm_jax.training.train import NonFiniteLossError, train
from ddsm_jax.training.train_step import TrainState, make_optimizer, make_train_step, sandwich_loss
from tests.helpers import tiny_config


def test_sandwich_rule_trains_largest_smallest_and_a_random_middle_width():
    widths = (1.0, 0.75, 0.5, 0.25)
    drawn = [sandwich_widths(widths, seed=0, step=s) for s in range(200)]
    assert all(d[:2] == (1.0, 0.25) and d[2] in (0.75, 0.5) for d in drawn)
    middles = [d[2] for d in drawn]
    assert 60 < middles.count(0.75) < 140  # both middle widths are drawn, about equally
    # Keyed by (seed, step): the same answer in any order, on any host, after any restart.
    assert [sandwich_widths(widths, 0, s) for s in reversed(range(200))] == drawn[::-1]
    assert [sandwich_widths(widths, 1, s) for s in range(200)] != drawn
    assert sandwich_widths((1.0, 0.5), 0, 3) == (1.0, 0.5)


def test_sandwich_steps_decrease_the_loss_on_real_digits():
    config = tiny_config()
    config.training.learning_rate = 2e-3
    network, params = init_network(config, jax.random.key(0))
    diffusion = diffusion_from_config(config.diffusion)
    data = load_dataset(config.data)
    held_out = jnp.asarray(data.eval[:128])

    @jax.jit
    def held_out_loss(params):
        keys = jax.random.split(jax.random.key(42), 4)
        return jnp.mean(jnp.stack([
            sandwich_loss(network, diffusion, params, held_out, k, (1.0, 0.25, 0.5))[0] for k in keys]))

    state = TrainState.create(params, make_optimizer(config.training))
    step = make_train_step(network, diffusion, config.training)
    before = float(held_out_loss(state.params))
    train_images = data.train[:512]
    rng = jax.random.key(1)
    for i in range(40):
        batch = jnp.asarray(train_images[(i * 16) % 512:(i * 16) % 512 + 16])
        state, metrics = step(state, batch, rng, sandwich_widths(network.widths, 0, i))
    after = float(held_out_loss(state.params))
    assert np.isfinite(metrics["loss"])
    assert after < 0.6 * before, (before, after)
    assert step._cache_size() == 2  # one compiled step per middle width, never per step


def test_in_place_distillation_learns_from_the_full_width_without_moving_it():
    """Two copies of the full width as the sandwich, no dropout: the second learns the target
    halfway between the noise and the first's prediction, |e - n|^2 / 4 with the teacher held
    still, so its gradient is half the first's (a teacher that moved would give a quarter)."""
    config = tiny_config(dropout=0.0)
    network, params = init_network(config, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda p: p + 0.01, params)  # no zero-initialised output
    diffusion = diffusion_from_config(config.diffusion)
    images = jnp.asarray(load_dataset(config.data).train[:8])

    def loss(p, which):
        total, per_width = sandwich_loss(network, diffusion, p, images, jax.random.key(3),
                                         (1.0, 1.0), distillation=0.5)
        return total if which is None else per_width[which]

    _, per_width = sandwich_loss(network, diffusion, params, images, jax.random.key(3),
                                 (1.0, 1.0), distillation=0.5)
    np.testing.assert_allclose(per_width[1], per_width[0] / 4, rtol=1e-5)
    full_only = jax.grad(loss)(params, 0)
    both = jax.grad(loss)(params, None)
    for a, b in zip(jax.tree_util.tree_leaves(both), jax.tree_util.tree_leaves(full_only)):
        np.testing.assert_allclose(a, 1.5 * b, rtol=1e-4, atol=1e-9)
    # Without distillation each width draws its own noisy batch: the losses differ.
    _, apart = sandwich_loss(network, diffusion, params, images, jax.random.key(3), (1.0, 1.0))
    assert abs(float(apart[1]) - float(apart[0])) > 1e-3 * float(apart[0])


def _params_after(config, workdir):
    result = train(config, workdir)
    return jax.tree_util.tree_leaves(jax.device_get((result.state.params, result.state.ema_params)))


def test_training_is_deterministic_and_resume_is_bitwise_identical(tmp_path):
    # Run c repeats run a's first 4 steps from scratch, then resumes: equal final parameters
    # need both the same seed to give the same steps and the resume to lose nothing.
    uninterrupted = _params_after(tiny_config(num_steps=8), tmp_path / "a")
    _params_after(tiny_config(num_steps=4), tmp_path / "c")  # "killed" after its step-4 checkpoint
    resumed = _params_after(tiny_config(num_steps=8), tmp_path / "c")
    for x, y in zip(uninterrupted, resumed):
        np.testing.assert_array_equal(x, y)
    lines = (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # logged every 2 steps: 2, 4 then 6, 8 after the restart


def test_a_nan_loss_stops_training_with_a_clear_error(tmp_path):
    config = tiny_config(num_steps=4)
    config.training.learning_rate = float("nan")
    with pytest.raises(NonFiniteLossError, match="learning_rate"):
        train(config, tmp_path)


def test_both_cpu_schedulers_compile_the_same_update():
    """`training.cpu_scheduler` only reorders XLA:CPU's work: an unknown option name would fail
    to compile, and a scheduler that changed the arithmetic would change the parameters."""
    config = tiny_config()
    network, params = init_network(config, jax.random.key(0))
    diffusion = diffusion_from_config(config.diffusion)
    batch = jnp.asarray(load_dataset(config.data).train[:16])
    updated = []
    for scheduler in ("memory", "concurrency"):
        config.training.cpu_scheduler = scheduler
        step = make_train_step(network, diffusion, config.training)
        fresh = jax.tree_util.tree_map(jnp.copy, params)  # the step donates its state
        state, _ = step(TrainState.create(fresh, make_optimizer(config.training)), batch,
                        jax.random.key(1), (1.0,))
        updated.append(jax.device_get(state.params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, *updated)
    config.training.cpu_scheduler = "fastest"
    with pytest.raises(ValueError, match="cpu_scheduler='fastest'.*'memory', 'concurrency'"):
        make_train_step(network, diffusion, config.training)
