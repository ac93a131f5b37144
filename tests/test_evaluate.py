"""Evaluate mode: metrics.json's shape, shared noise across entries, and the CLI stages."""

import json

import jax
import pytest

from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.eval.evaluate import evaluate
from ddsm_jax.eval.feature_space import feature_extractor
from ddsm_jax.models.network import init_network
from ddsm_jax.sampling import ScheduleSampler
from tests.helpers import tiny_config


def eval_config():
    config = tiny_config()
    config.sampling.num_steps = 6
    config.eval.num_samples = 24
    config.eval.num_reference = 200
    config.eval.kid_subsets = 5
    return config


def test_metrics_json_has_every_entry_from_the_same_noise(tmp_path, digits_classifier):
    digits_classifier(tmp_path)
    config = eval_config()
    network, params = init_network(config, jax.random.key(0))
    diffusion = diffusion_from_config(config.diffusion)
    sampler = ScheduleSampler(network, diffusion, config.sampling)
    # A "schedule" that is full width everywhere must score exactly like the full entry:
    # that only holds if both sampled the same noise.
    schedule = sampler.to_width_schedule([0] * 6)
    metrics = evaluate(config, tmp_path, network, diffusion, params, schedule=schedule,
                       progress=False)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert sorted(saved["uniform"]) == ["0.25", "0.5", "0.75"]
    for entry in [saved["full"], saved["schedule"], *saved["uniform"].values()]:
        assert set(entry) >= {"fd", "kid", "macs_mean", "macs_ratio", "seconds"}
    assert saved["schedule"]["fd"] == saved["full"]["fd"]
    assert saved["schedule"]["kid"] == saved["full"]["kid"]
    assert saved["full"]["macs_ratio"] == 1.0
    ratios = [saved["uniform"][w]["macs_ratio"] for w in ("0.75", "0.5", "0.25")]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] < 0.1
    assert saved["noise"]["fd"] > 0 and saved["features"]["name"] == "classifier_digits"
    assert saved["features"]["test_accuracy"] > 0.9
    for name in ("full", "schedule", "uniform_0.5", "fewer_3", "samples"):
        assert (tmp_path / "eval" / f"{name}.png").is_file()
    # The baseline: full width with fewer steps, at a quarter, half, three quarters of the MACs.
    assert sorted(saved["fewer_steps"], key=int) == ["2", "3", "4"]
    for steps, entry in saved["fewer_steps"].items():
        assert entry["macs_ratio"] == pytest.approx(int(steps) / 6)
    assert saved["strategy"] == "ddsm" and saved["seed"] == config.seed
    training = saved["training"]
    assert training["images"] == config.training.num_steps * config.training.batch_size
    # Each sandwich step trains full width, 0.25 and one of 0.75/0.5: more than full alone.
    assert 1.1 < training["macs_ratio"] < 1.7


def test_feature_space_choice_and_missing_inception_weights(tmp_path):
    config = tiny_config()
    config.data.name = "cifar10"
    with pytest.raises(FileNotFoundError, match="convert_inception"):
        feature_extractor(config, tmp_path)
    config.eval.features = "pixels"
    with pytest.raises(ValueError, match="'auto', 'domain' or 'inception'"):
        feature_extractor(config, tmp_path)
