"""The domain feature network: accuracy on real held-out digits, determinism, the cache, and
whether its features tell real digits from noise."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from ddsm_jax.configs import cifar10, digits, mnist
from ddsm_jax.data.pipeline import load_dataset
from ddsm_jax.eval import classifier
from ddsm_jax.eval.classifier import (
    ClassifierSettings,
    domain_extractor,
    train_classifier,
)
from ddsm_jax.eval.features import compute_features
from ddsm_jax.eval.metrics import feature_statistics, frechet_distance

# A few steps: enough to exercise training, caching and determinism in a few seconds.
QUICK = ClassifierSettings(num_steps=15)


def _same_tree(a, b) -> bool:
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope="module")
def digits_data():
    return load_dataset(digits.get_config().data)


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    """The real digits classifier with the default settings, trained once for this module."""
    workdir = tmp_path_factory.mktemp("classifier")
    extractor, info = domain_extractor(digits.get_config(), workdir, progress=False)
    return extractor, info, workdir


def test_digits_classifier_reaches_95_percent_on_held_out_digits(trained_digits):
    _, info, workdir = trained_digits
    assert info["dataset"] == "digits"
    assert (info["num_train"], info["num_test"]) == (1617, 180)
    assert info["feature_dim"] == 128
    assert info["test_accuracy"] >= 0.95, info
    assert not info["from_cache"]
    # The cache holds the weights and the same facts.
    (weights,) = (workdir / "eval" / "classifier").glob("digits_*.npz")
    cached = json.loads(weights.with_suffix(".json").read_text())
    assert cached["test_accuracy"] == info["test_accuracy"]


@pytest.mark.slow
def test_mnist_classifier_reaches_97_percent_on_held_out_digits(tmp_path):
    _, info = domain_extractor(mnist.get_config(), tmp_path, progress=False)
    assert (info["num_train"], info["num_test"]) == (4500, 500)
    assert info["test_accuracy"] >= 0.97, info


def test_training_is_deterministic_per_seed(digits_data):
    _, params_a = train_classifier(digits_data, QUICK, seed=3, progress=False)
    _, params_b = train_classifier(digits_data, QUICK, seed=3, progress=False)
    _, params_c = train_classifier(digits_data, QUICK, seed=4, progress=False)
    assert _same_tree(params_a, params_b)
    assert not _same_tree(params_a, params_c)


def test_cache_is_reused_and_a_damaged_cache_is_retrained_with_a_warning(tmp_path):
    config = digits.get_config()
    first, info = domain_extractor(config, tmp_path, settings=QUICK, progress=False)
    weights, info_file = classifier.cache_paths(config, tmp_path, QUICK, seed=0)
    assert weights.is_file() and info_file.is_file() and not info["from_cache"]
    assert [p.name for p in weights.parent.iterdir() if p.name.startswith(".")] == []  # no tmp
    mtime = os.stat(weights).st_mtime_ns

    second, cached_info = domain_extractor(config, tmp_path, settings=QUICK, progress=False)
    assert cached_info["from_cache"]
    assert cached_info["train_seconds"] == info["train_seconds"]  # the recorded run, not a new one
    assert os.stat(weights).st_mtime_ns == mtime
    assert _same_tree(first.params, second.params)

    # Everything that changes the weights changes the file: seed, settings, held-out split.
    other_split = digits.get_config()
    other_split.data.split_seed = 1
    keys = {weights.name,
            classifier.cache_paths(config, tmp_path, QUICK, seed=1)[0].name,
            classifier.cache_paths(config, tmp_path, ClassifierSettings(), seed=0)[0].name,
            classifier.cache_paths(other_split, tmp_path, QUICK, seed=0)[0].name}
    assert len(keys) == 4

    # A half-written file (as a crash without the atomic write would leave) is retrained,
    # with a warning naming it, into the same deterministic weights.
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.warns(RuntimeWarning, match=f"damaged classifier cache .*{weights.name}"):
        third, retrained_info = domain_extractor(config, tmp_path, settings=QUICK, progress=False)
    assert not retrained_info["from_cache"]
    assert _same_tree(first.params, third.params)
    _, reloaded = domain_extractor(config, tmp_path, settings=QUICK, progress=False)
    assert reloaded["from_cache"]


def test_features_place_held_out_digits_near_training_digits_and_noise_far(trained_digits,
                                                                            digits_data):
    extractor, _, _ = trained_digits
    train = compute_features(extractor, digits_data.train, batch_size=256)
    held_out = compute_features(extractor, digits_data.eval, batch_size=256)
    noise_images = np.clip(np.random.default_rng(0).normal(size=digits_data.eval.shape), -1, 1)
    noise = compute_features(extractor, noise_images.astype(np.float32), batch_size=256)
    assert train.shape == (1617, 128) and held_out.shape == noise.shape == (180, 128)
    assert np.isfinite(train).all()

    reference = feature_statistics(train)
    fd_held_out = frechet_distance(*feature_statistics(held_out), *reference)
    fd_noise = frechet_distance(*feature_statistics(noise), *reference)
    assert fd_held_out * 10 < fd_noise, (fd_held_out, fd_noise)


def test_classifier_works_at_any_image_size():
    for size in (5, 8, 28):
        model, params = classifier.init_classifier(ClassifierSettings(), (size, size, 1),
                                                   jax.random.key(0))
        logits, features = model.apply(params, np.zeros((3, size, size, 1), np.float32))
        assert logits.shape == (3, 10) and features.shape == (3, 128)


def test_random_shift_moves_digits_without_mirroring_them():
    rng = np.random.default_rng(0)
    images = np.full((64, 8, 8, 1), -1.0, np.float32)
    images[:, 2:6, 2:6, 0] = rng.uniform(0, 1, (64, 4, 4))  # strokes away from the border
    shifted = np.asarray(classifier.random_shift(images, jax.random.key(0), max_shift=1))
    seen = set()
    for original, moved in zip(images, shifted):
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if np.array_equal(np.roll(original, (dy, dx), axis=(0, 1)), moved)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == 9  # every shift occurs


def test_unlabelled_data_sets_are_refused_with_a_pointer_to_inception_fid(tmp_path):
    with pytest.raises(ValueError, match=r"only for the labelled embedded.*inception_weights"):
        domain_extractor(cifar10.get_config(), tmp_path)


def test_settings_are_a_frozen_record_in_the_cache_key():
    config = digits.get_config()
    wider = dataclasses.replace(ClassifierSettings(), feature_dim=64)
    assert classifier.cache_key(config, wider, 0) != classifier.cache_key(
        config, ClassifierSettings(), 0)
