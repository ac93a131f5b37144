"""Tests of the diffusion core: schedules, the loss, and the step-aware samplers.

The hand-computed cases re-derive every sampler step in float64 numpy from the textbook formulas
(DDPM's mean written as 1/sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - abar_t) * eps), not via the
posterior coefficients the implementation uses), with the same fold_in noise rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddsm_jax.diffusion import losses, samplers, schedules
from ddsm_jax.diffusion.schedules import Diffusion

BETAS3 = np.array([0.1, 0.2, 0.3])
SHAPE = (2, 3, 3, 1)


def _x_T(seed: int = 1, scale: float = 0.6) -> jax.Array:
    return scale * jax.random.normal(jax.random.PRNGKey(seed), SHAPE, jnp.float32)


def _noise(key: jax.Array, step: int, shape=SHAPE) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.fold_in(key, step), shape), np.float64)


def _scaled(c: float):
    """A linear denoiser eps = c * x, a stand-in for one network width."""
    return lambda x, t: c * x


def _t_dependent(x, t):
    return 0.5 * x + 0.05 * t[:, None, None, None].astype(x.dtype)


def _np_t_dependent(x, t):
    return 0.5 * x + 0.05 * t


# ------------------------------------------------------------------ schedules


def test_linear_betas():
    betas = schedules.make_betas("linear", 1000)
    assert betas.shape == (1000,) and betas.dtype == np.float64
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.all(np.diff(betas) > 0)
    custom = schedules.make_betas("linear", 10, beta_start=0.01, beta_end=0.5)
    assert custom[0] == pytest.approx(0.01) and custom[-1] == pytest.approx(0.5)


def test_cosine_betas():
    betas = schedules.make_betas("cosine", 1000)
    assert betas.shape == (1000,)
    assert np.all(betas > 0) and np.all(betas <= 0.999)
    assert betas[-1] == pytest.approx(0.999)  # the clip is active at the end
    alphas_cumprod = np.cumprod(1 - betas)
    # Nichol & Dhariwal: abar_t = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(alphas_cumprod[:500], f(np.arange(1, 501) / 1000) / f(0), rtol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alphas_cumprod_decreasing(kind):
    d = Diffusion.create(schedules.make_betas(kind, 200))
    ac = np.asarray(d.alphas_cumprod)
    assert d.num_timesteps == 200 and ac.dtype == np.float32
    assert np.all(np.diff(ac) < 0) and 0 < ac[-1] < ac[0] < 1


def test_unknown_beta_schedule():
    with pytest.raises(ValueError, match=r"unknown beta schedule 'quartic'.*linear.*cosine"):
        schedules.make_betas("quartic", 10)


def test_diffusion_coefficients_small_case():
    d = Diffusion.create(BETAS3)
    ab = np.cumprod(1 - BETAS3)
    ab_prev = np.array([1.0, ab[0], ab[1]])
    np.testing.assert_allclose(d.alphas_cumprod, ab, rtol=1e-6)
    np.testing.assert_allclose(d.alphas_cumprod_prev, ab_prev, rtol=1e-6)
    pv = BETAS3 * (1 - ab_prev) / (1 - ab)
    assert pv[0] == 0
    np.testing.assert_allclose(d.posterior_variance, pv, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(d.posterior_log_variance_clipped, np.log([pv[1], pv[1], pv[2]]),
                               rtol=1e-6)
    np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / ab - 1), rtol=1e-6)


def test_diffusion_from_config_and_pytree():
    cfg = ml_collections.ConfigDict({"num_timesteps": 50, "beta_schedule": "linear",
                                         "beta_start": 1e-3, "beta_end": 0.05})
    d = schedules.diffusion_from_config(cfg)
    assert d.num_timesteps == 50
    np.testing.assert_allclose(np.asarray(d.betas)[[0, -1]], [1e-3, 0.05], rtol=1e-6)
    # num_timesteps is static: it is not a leaf and survives being passed through jit.
    assert len(jax.tree_util.tree_leaves(d)) == 11
    out = jax.jit(lambda diff: diff.alphas_cumprod[diff.num_timesteps - 1])(d)
    assert float(out) == pytest.approx(float(d.alphas_cumprod[-1]))


def test_q_sample_statistics():
    d = Diffusion.create(schedules.make_betas("linear", 1000))
    key_sign, key_noise = jax.random.split(jax.random.PRNGKey(0))
    shape = (4096, 4, 4, 1)
    x0 = 0.8 * jnp.sign(jax.random.normal(key_sign, shape))  # E x0 = 0, x0^2 = 0.64
    noise = jax.random.normal(key_noise, shape)
    for t_value in (0, 300, 999):
        t = jnp.full((shape[0],), t_value, jnp.int32)
        x_t = np.asarray(schedules.q_sample(d, x0, t, noise))
        ab = float(d.alphas_cumprod[t_value])
        assert x_t.mean() == pytest.approx(0.0, abs=0.02)
        assert x_t.var() == pytest.approx(ab * 0.64 + 1 - ab, rel=0.03)
        # predict_x0_from_eps inverts q_sample given the true noise
        x0_hat = schedules.predict_x0_from_eps(d, jnp.asarray(x_t), t, noise)
        np.testing.assert_allclose(x0_hat, x0, atol=2e-3 if t_value < 999 else 0.2)


def test_q_sample_indexes_per_example():
    d = Diffusion.create(BETAS3)
    x0 = jnp.ones((3, 1, 1, 1))
    t = jnp.array([0, 1, 2], jnp.int32)
    x_t = schedules.q_sample(d, x0, t, jnp.zeros_like(x0))
    np.testing.assert_allclose(x_t[:, 0, 0, 0], np.sqrt(np.cumprod(1 - BETAS3)), rtol=1e-6)


# ------------------------------------------------------------------ loss


def test_epsilon_loss_zero_predictor_is_noise_variance():
    d = Diffusion.create(schedules.make_betas("linear", 100))
    x0 = jnp.zeros((512, 4, 4, 1))
    loss = losses.epsilon_loss(lambda x, t: jnp.zeros_like(x), d, x0, jax.random.PRNGKey(3))
    assert loss.shape == () and float(loss) == pytest.approx(1.0, abs=0.03)


def test_epsilon_loss_oracle_is_zero():
    """A denoiser that knows x0 recovers the noise exactly, at whatever t was drawn."""
    d = Diffusion.create(schedules.make_betas("linear", 100))
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (64, 4, 4, 3), minval=-1, maxval=1)
    seen_t = []

    def oracle(x_t, t):
        seen_t.append(t)
        return ((x_t - schedules.extract(d.sqrt_alphas_cumprod, t, 4) * x0)
                / schedules.extract(d.sqrt_one_minus_alphas_cumprod, t, 4))

    loss = losses.epsilon_loss(oracle, d, x0, jax.random.PRNGKey(5))
    assert float(loss) < 1e-6
    t = np.asarray(seen_t[0])
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() < 100 and len(np.unique(t)) > 10
    # The loss is a function of the key: another key gives another draw.
    wrong = lambda x_t, t: jnp.zeros_like(x_t)
    assert float(losses.epsilon_loss(wrong, d, x0, jax.random.PRNGKey(1))) != pytest.approx(
        float(losses.epsilon_loss(wrong, d, x0, jax.random.PRNGKey(2))), abs=1e-7)


# ------------------------------------------------------------------ hand-computed references


def _np_ddpm(eps_per_step, betas, x_T, key, variance):
    """Ancestral sampling from the textbook formulas; eps_per_step[i](x, t) for step i."""
    alphas = 1 - betas
    ab = np.cumprod(alphas)
    T = len(betas)
    x = np.asarray(x_T, np.float64)
    for i, t in enumerate(range(T - 1, -1, -1)):
        eps = eps_per_step[i](x, t)
        mean = (x - betas[t] / np.sqrt(1 - ab[t]) * eps) / np.sqrt(alphas[t])
        if t > 0:
            if variance == "fixedlarge":
                var = betas[t]
            else:
                var = (1 - ab[t - 1]) / (1 - ab[t]) * betas[t]
            x = mean + np.sqrt(var) * _noise(key, i, x.shape)
        else:
            x = mean
    return np.clip(x, -1, 1)


def _np_ddim(eps_per_step, betas, timesteps, x_T, key, eta):
    ab = np.cumprod(1 - betas)
    x = np.asarray(x_T, np.float64)
    for i, t in enumerate(timesteps):
        eps = eps_per_step[i](x, t)
        a_t = ab[t]
        a_prev = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma ** 2) * eps
             + sigma * _noise(key, i, x.shape))
    return np.clip(x, -1, 1)


def _assert_informative(ref):
    """Guard against vacuous comparisons where the final clip saturates everything."""
    assert np.mean(np.abs(ref) < 1) > 0.5, ref


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_ddpm_hand_computed(variance):
    d = Diffusion.create(BETAS3)
    x_T, key = _x_T(), jax.random.PRNGKey(7)
    ref = _np_ddpm([_np_t_dependent] * 3, BETAS3, x_T, key, variance)
    _assert_informative(ref)
    out = samplers.ddpm_sample([_t_dependent], d, jnp.zeros(3, jnp.int32), x_T, key,
                               variance=variance)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_ddpm_variances_differ():
    d = Diffusion.create(BETAS3)
    args = ([_t_dependent], d, jnp.zeros(3, jnp.int32), _x_T(), jax.random.PRNGKey(7))
    large = samplers.ddpm_sample(*args, variance="fixedlarge")
    small = samplers.ddpm_sample(*args, variance="fixedsmall")
    assert np.max(np.abs(large - small)) > 1e-3


def test_ddpm_clip_denoised_hand_computed():
    d = Diffusion.create(BETAS3)
    x_T, key = _x_T(scale=2.0), jax.random.PRNGKey(2)
    betas, ab = BETAS3, np.cumprod(1 - BETAS3)
    x = np.asarray(x_T, np.float64)
    for i, t in enumerate([2, 1, 0]):
        eps = _np_t_dependent(x, t)
        x0 = np.clip((x - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t]), -1, 1)
        ab_prev = ab[t - 1] if t > 0 else 1.0
        mean = (np.sqrt(ab_prev) * betas[t] * x0 + np.sqrt(1 - betas[t]) * (1 - ab_prev) * x) / (1 - ab[t])
        x = mean + (np.sqrt(betas[t]) * _noise(key, i) if t > 0 else 0)
    ref = np.clip(x, -1, 1)
    _assert_informative(ref)
    out = samplers.ddpm_sample([_t_dependent], d, jnp.zeros(3, jnp.int32), x_T, key,
                               clip_denoised=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    unclipped = samplers.ddpm_sample([_t_dependent], d, jnp.zeros(3, jnp.int32), x_T, key)
    assert np.max(np.abs(out - unclipped)) > 1e-3


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_hand_computed(eta):
    d = Diffusion.create(BETAS3)
    x_T, key = _x_T(), jax.random.PRNGKey(11)
    timesteps = np.array([2, 0])
    ref = _np_ddim([_np_t_dependent] * 2, BETAS3, timesteps, x_T, key, eta)
    _assert_informative(ref)
    out = samplers.ddim_sample([_t_dependent], d, timesteps, jnp.zeros(2, jnp.int32), x_T, key,
                               eta=eta)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_ddim_eta_zero_ignores_key_eta_one_does_not():
    d = Diffusion.create(BETAS3)
    ts, ws = np.array([2, 1, 0]), jnp.zeros(3, jnp.int32)
    run = lambda eta, seed: samplers.ddim_sample(
        [_t_dependent], d, ts, ws, _x_T(), jax.random.PRNGKey(seed), eta=eta)
    np.testing.assert_array_equal(run(0.0, 1), run(0.0, 2))
    assert np.max(np.abs(run(1.0, 1) - run(1.0, 2))) > 1e-3


# ------------------------------------------------------------------ step-aware behaviour


def test_step_aware_ddpm_uses_scheduled_denoiser():
    d = Diffusion.create(BETAS3)
    x_T, key = _x_T(), jax.random.PRNGKey(4)
    eps_fns = [_scaled(0.1), _scaled(0.3)]
    schedule = np.array([0, 1, 0], np.int32)
    np_fns = {0: lambda x, t: 0.1 * x, 1: lambda x, t: 0.3 * x}
    ref = _np_ddpm([np_fns[w] for w in schedule], BETAS3, x_T, key, "fixedlarge")
    _assert_informative(ref)
    out = jax.jit(lambda ws, x, k: samplers.ddpm_sample(eps_fns, d, ws, x, k))(
        jnp.asarray(schedule), x_T, key)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # a different schedule gives a different (and also correct) answer from the same compiled fn
    other = np.array([1, 0, 1], np.int32)
    ref_other = _np_ddpm([np_fns[w] for w in other], BETAS3, x_T, key, "fixedlarge")
    out_other = samplers.ddpm_sample(eps_fns, d, jnp.asarray(other), x_T, key)
    np.testing.assert_allclose(out_other, ref_other, atol=1e-5)
    assert np.max(np.abs(ref - ref_other)) > 1e-3


def test_step_aware_ddim_uses_scheduled_denoiser():
    d = Diffusion.create(BETAS3)
    x_T, key = _x_T(), jax.random.PRNGKey(4)
    eps_fns = [_scaled(0.1), _scaled(0.3)]
    schedule = np.array([0, 1, 0], np.int32)
    np_fns = {0: lambda x, t: 0.1 * x, 1: lambda x, t: 0.3 * x}
    ref = _np_ddim([np_fns[w] for w in schedule], BETAS3, np.array([2, 1, 0]), x_T, key, 0.5)
    out = samplers.sample(eps_fns, d, schedule, x_T, key, method="ddim",
                          timesteps=np.array([2, 1, 0]), eta=0.5)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_only_the_chosen_branch_runs(method):
    num_steps = 7
    d = Diffusion.create(schedules.make_betas("linear", num_steps, 0.01, 0.2))
    counts = [0, 0]

    def counted(branch, c):
        def bump():
            counts[branch] += 1

        def eps_fn(x, t):
            jax.debug.callback(bump)
            return c * x
        return eps_fn

    eps_fns = [counted(0, 0.1), counted(1, 0.3)]
    schedule = jnp.array([0, 1, 1, 0, 0, 1, 0], jnp.int32)  # 4 x branch 0, 3 x branch 1
    timesteps = samplers.sampling_timesteps(method, num_steps, num_steps, "uniform")
    fn = jax.jit(lambda ws, x, k: samplers.sample(eps_fns, d, ws, x, k, method=method,
                                                  timesteps=timesteps, eta=1.0))
    x_T = _x_T()
    fn(schedule, x_T, jax.random.PRNGKey(0)).block_until_ready()
    jax.effects_barrier()
    assert counts == [4, 3]
    # a second schedule re-uses the compiled program and still runs only the chosen branches
    fn(jnp.array([1, 1, 1, 1, 1, 1, 0], jnp.int32), x_T, jax.random.PRNGKey(0)).block_until_ready()
    jax.effects_barrier()
    assert counts == [4 + 1, 3 + 6]


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_common_random_numbers(method):
    d = Diffusion.create(schedules.make_betas("linear", 5, 0.01, 0.2))
    timesteps = samplers.sampling_timesteps(method, 5, 5, "uniform")
    # Two separately defined but identical denoisers: the schedule must not change the noise.
    eps_fns = [_scaled(0.2), _scaled(0.2)]
    x_T = _x_T()
    run = lambda schedule, seed: np.asarray(samplers.sample(
        eps_fns, d, jnp.asarray(schedule, jnp.int32), x_T, jax.random.PRNGKey(seed),
        method=method, timesteps=timesteps, eta=1.0))
    a = run([0, 0, 0, 0, 0], 3)
    b = run([1, 0, 1, 1, 0], 3)
    c = run([0, 1, 0, 0, 1], 3)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)
    assert np.max(np.abs(a - run([0, 0, 0, 0, 0], 4))) > 1e-3


def test_single_denoiser_skips_switch():
    d = Diffusion.create(BETAS3)
    jaxpr = jax.make_jaxpr(lambda x, k: samplers.ddpm_sample(
        [_scaled(0.1)], d, jnp.zeros(3, jnp.int32), x, k))(_x_T(), jax.random.PRNGKey(0))
    assert "cond" not in str(jaxpr)
    jaxpr2 = jax.make_jaxpr(lambda x, k: samplers.ddpm_sample(
        [_scaled(0.1), _scaled(0.3)], d, jnp.zeros(3, jnp.int32), x, k))(_x_T(), jax.random.PRNGKey(0))
    assert "cond" in str(jaxpr2) and "scan" in str(jaxpr2)


# ------------------------------------------------------------------ timesteps


def test_ddim_timesteps_uniform():
    ts = samplers.ddim_timesteps(1000, 10, "uniform")
    np.testing.assert_array_equal(ts, np.arange(900, -1, -100))
    np.testing.assert_array_equal(samplers.ddim_timesteps(10, 3, "uniform"), [6, 3, 0])
    np.testing.assert_array_equal(samplers.ddim_timesteps(10, 10), np.arange(9, -1, -1))


def test_ddim_timesteps_quadratic():
    ts = samplers.ddim_timesteps(1000, 10, "quadratic")
    assert ts.shape == (10,)
    assert np.all(np.diff(ts) < 0)
    assert ts[-1] == 0 and ts[0] in (799, 800)  # sqrt(800)**2 may round either way
    np.testing.assert_array_equal(ts[::-1], (np.linspace(0, np.sqrt(800), 10) ** 2).astype(int))


def test_sampling_timesteps():
    np.testing.assert_array_equal(samplers.sampling_timesteps("ddpm", 4, None, "uniform"), [3, 2, 1, 0])
    np.testing.assert_array_equal(samplers.sampling_timesteps("ddpm", 4, 4, "uniform"), [3, 2, 1, 0])
    np.testing.assert_array_equal(samplers.sampling_timesteps("ddim", 100, 4, "uniform"), [75, 50, 25, 0])
    with pytest.raises(ValueError, match="all 4 steps"):
        samplers.sampling_timesteps("ddpm", 4, 2, "uniform")


# ------------------------------------------------------------------ errors


def test_ddim_timesteps_errors():
    with pytest.raises(ValueError, match=r"num_steps=20.*num_timesteps=10"):
        samplers.ddim_timesteps(10, 20)
    with pytest.raises(ValueError, match="repeated timesteps"):
        samplers.ddim_timesteps(10, 10, "quadratic")
    with pytest.raises(ValueError, match="unknown DDIM spacing 'cubic'"):
        samplers.ddim_timesteps(100, 10, "cubic")


def test_unknown_sampler_name():
    d = Diffusion.create(BETAS3)
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'.*ddpm.*ddim"):
        samplers.sample([_scaled(0.1)], d, jnp.zeros(3, jnp.int32), _x_T(), jax.random.PRNGKey(0),
                        method="euler")
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        samplers.sampling_timesteps("euler", 3, 3, "uniform")
    with pytest.raises(ValueError, match="unknown DDPM variance 'learned'"):
        samplers.ddpm_sample([_scaled(0.1)], d, jnp.zeros(3, jnp.int32), _x_T(),
                             jax.random.PRNGKey(0), variance="learned")


def test_wrong_schedule_length():
    d = Diffusion.create(BETAS3)
    with pytest.raises(ValueError, match=r"\(2 entries\).*runs 3 steps"):
        samplers.ddpm_sample([_scaled(0.1)], d, jnp.zeros(2, jnp.int32), _x_T(), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"\(3 entries\).*runs 2 steps"):
        samplers.ddim_sample([_scaled(0.1)], d, np.array([2, 0]), jnp.zeros(3, jnp.int32), _x_T(),
                             jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 2\)"):
        samplers.ddpm_sample([_scaled(0.1), _scaled(0.2)], d, np.array([0, 2, 1]), _x_T(),
                             jax.random.PRNGKey(0))


def test_bad_timesteps():
    d = Diffusion.create(BETAS3)
    with pytest.raises(ValueError, match="strictly descending"):
        samplers.ddim_sample([_scaled(0.1)], d, np.array([0, 2]), jnp.zeros(2, jnp.int32), _x_T(),
                             jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        samplers.ddim_sample([_scaled(0.1)], d, np.array([3, 0]), jnp.zeros(2, jnp.int32), _x_T(),
                             jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="DDIM needs timesteps"):
        samplers.sample([_scaled(0.1)], d, jnp.zeros(2, jnp.int32), _x_T(), jax.random.PRNGKey(0),
                        method="ddim")
