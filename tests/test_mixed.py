"""Mixed schedules: branches of two trained networks behind one schedule, checked against the
members sampled on their own, and the `ddsm_jax.mix` command on checkpointed workdirs."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddsm_jax.diffusion import samplers
from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.cost import SchedulePrices, reference_macs, width_macs
from ddsm_jax.models.network import init_network
from ddsm_jax.sampling import ScheduleSampler
from ddsm_jax.strategies.mixed import Member, check_mixable, mix
from ddsm_jax.training.checkpoint import Checkpointer, network_identity
from ddsm_jax.training.train import _initial_state
from ddsm_jax.utils.files import write_text_atomically
from tests.helpers import tiny_config
from tests.test_continuous_unet import continuous_config


def changed(config, **values):
    """A copy of `config` with `values` set ("data.image_size": 16 as data__image_size=16)."""
    copy = config.copy_and_resolve_references()
    for name, value in values.items():
        section, _, key = name.rpartition("__")
        (copy[section] if section else copy)[key] = value
    return copy


def nonzero(params):
    return jax.tree_util.tree_map(lambda p: p + 0.01, params)  # no zero-initialised output


@pytest.fixture(scope="module")
def members():
    unet_config, ode_config = tiny_config(), continuous_config()
    unet, unet_params = init_network(unet_config, jax.random.key(0))
    ode, ode_params = init_network(ode_config, jax.random.key(1))
    return unet_config, [Member("unet", unet, nonzero(unet_params)),
                         Member("ode", ode, nonzero(ode_params))]


def test_branches_are_priced_against_the_full_unet_costliest_first(members):
    config, (unet, ode) = members
    network, params, dropped = mix([unet, ode], reference_macs(config))
    reference = width_macs(unet.network, unet.params, 1.0).total
    expected = {f"unet {w:g}": width_macs(unet.network, unet.params, w).total / reference
                for w in unet.network.widths}
    expected |= {f"ode {f:g}": width_macs(ode.network, ode.params,
                                          solver_fraction=f).total / reference
                 for f in ode.network.widths}
    assert dropped == [] and sorted(network.labels) == sorted(expected)
    assert list(network.widths) == sorted(network.widths, reverse=True)
    for code, label in zip(network.widths, network.labels):
        assert code == round(expected[label], 4), label
    prices = SchedulePrices.of(network, params, [0, 1], changed(config, strategy="mixed"))
    np.testing.assert_allclose(prices.ratios[0], [expected[label] for label in network.labels])
    # A network mixed with itself: the second copy's branches are the first's, left out.
    _, _, dropped = mix([unet, unet], reference_macs(config))
    assert dropped == [f"unet {w:g}" for w in unet.network.widths]


def test_a_mixed_schedule_samples_as_the_members_branches_would(members):
    config, (unet, ode) = members
    network, params, _ = mix([unet, ode], reference_macs(config))
    diffusion = diffusion_from_config(config.diffusion)
    sampler = ScheduleSampler(network, diffusion, config.sampling)
    steps = sampler.num_steps
    noise = jax.random.normal(jax.random.key(5), (4, *network.image_shape))
    key = jax.random.key(6)
    # A branch alone is its member's network alone, to the bit (one of each member's).
    for member, value in [(unet, 0.5), (ode, 0.5)]:
        index = network.labels.index(f"{member.name} {value:g}")
        alone = ScheduleSampler(member.network, diffusion, config.sampling)
        own = member.network.widths.index(value)
        np.testing.assert_array_equal(sampler(params, sampler.uniform(index), noise, key),
                                      alone(member.params, alone.uniform(own), noise, key))
    # The continuous U-Net's one solver step on the noisy half, the full U-Net on the rest.
    cheap, full = network.labels.index("ode 0.5"), network.labels.index("unet 1")
    schedule = np.where(np.arange(steps) < steps // 2, cheap, full)
    eps_fns = [functools.partial(ode.network.apply, ode.params, solver_fraction=0.5),
               functools.partial(unet.network.apply, unet.params, width=1.0)]
    expected = samplers.sample(
        eps_fns, diffusion, (schedule == full).astype(np.int32), noise, key,
        method=sampler.method, timesteps=sampler.timesteps, eta=sampler.eta,
        variance=sampler.variance, clip_denoised=sampler.clip_denoised)
    # On one device, as `expected` ran: a batch split over devices differs by float rounding.
    one_device = ScheduleSampler(network, diffusion, config.sampling, devices=jax.devices()[:1])
    np.testing.assert_allclose(one_device(params, schedule, noise, key), expected, atol=1e-6)


def test_only_networks_of_one_data_set_and_noise_schedule_mix(members):
    config, _ = members
    with pytest.raises(ValueError, match="multistage run: each of its steps runs the model"):
        check_mixable(config, changed(config, strategy="multistage"), "W")
    with pytest.raises(ValueError, match="data.image_size=16 but the config has 8"):
        check_mixable(config, changed(config, data__image_size=16), "W")
    with pytest.raises(ValueError, match="one noise schedule"):
        check_mixable(config, changed(config, diffusion__num_timesteps=500), "W")


def checkpointed(workdir, config) -> None:
    """A workdir as training leaves it (its initial weights, nudged off zero, as step 1)."""
    _, state, _ = _initial_state(config)
    state = state.replace(ema_params=nonzero(state.ema_params))
    checkpointer = Checkpointer(workdir / "checkpoints", identity=network_identity(config))
    checkpointer.save(1, state, {"next_index": 0})
    checkpointer.close()
    write_text_atomically(workdir / "config.json", config.to_json_best_effort())


def run_mix(*args):
    return subprocess.run([sys.executable, "-m", "ddsm_jax.mix", "--config=configs/digits.py:tiny",
                           "--config.sampling.num_steps=4", "--config.sampling.batch_size=8",
                           "--config.search.population_size=8", "--config.search.generations=1",
                           "--config.search.num_samples=16", "--config.search.validation_samples=16",
                           "--config.eval.num_samples=16", "--config.eval.num_reference=200",
                           "--config.eval.kid_subsets=5", *args], capture_output=True, text=True)


def test_the_mix_command_searches_and_evaluates_a_mixture(tmp_path, digits_classifier):
    unet_dir, ode_dir, out = tmp_path / "unet", tmp_path / "ode", tmp_path / "mixed"
    checkpointed(unet_dir, tiny_config(widths=(1.0, 0.5)))
    checkpointed(ode_dir, continuous_config())
    digits_classifier(unet_dir)  # the mixture copies its first member's classifier
    done = run_mix(f"--workdirs={unet_dir},{ode_dir}", f"--workdir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    branches = reports[0]["branches"]
    assert sorted(branches.values()) == ["ode 0.5", "ode 1", "unet 0.5", "unet 1"]
    assert [r.get("stage") for r in reports[1:]] == ["search", "evaluate"]
    schedule = json.loads((out / "search" / "schedule.json").read_text())
    assert schedule["widths"] == [float(code) for code in branches]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["strategy"] == "mixed" and metrics["branch_labels"] == list(branches.values())
    assert metrics["full"]["macs_ratio"] == 1.0 and len(metrics["uniform"]) == 3
    assert "schedule" in metrics and metrics["training"]["images"] == 2 * 8 * 16
    assert (out / "eval" / "classifier").is_dir()
    # The workdir belongs to this mixture: another one is refused, nothing touched.
    again = run_mix(f"--workdirs={ode_dir},{unet_dir}", f"--workdir={out}")
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1].startswith(
        f"error: {out} holds the mixture of {unet_dir},{ode_dir}")
    # A multi-stage workdir cannot mix: one line, before anything loads.
    staged = tmp_path / "staged"
    staged.mkdir()
    write_text_atomically(staged / "config.json",
                          changed(tiny_config(), strategy="multistage").to_json_best_effort())
    refused = run_mix(f"--workdirs={unet_dir},{staged}", f"--workdir={tmp_path / 'other'}")
    assert refused.returncode == 1 and "multistage run" in refused.stderr
    assert not (tmp_path / "other").exists()


def test_a_mixture_is_not_trained(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ddsm_jax.main", "--config=configs/digits.py",
                           "--config.strategy=mixed", f"--workdir={tmp_path / 'run'}"],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "python -m ddsm_jax.mix" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
