"""Embedded data sets, the held-out split, the grain training stream and image grids."""

from __future__ import annotations

import itertools

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ddsm_jax.data.embedded import load_digits_images
from ddsm_jax.data.pipeline import ImageDataset, load_dataset, split_indices, train_batches
from ddsm_jax.utils.images import make_grid, save_grid, to_uint8


def _cfg(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": "digits", "eval_fraction": 0.1, **fields})


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_dataset(_cfg(image_size=8, channels=1))


@pytest.fixture(scope="module")
def mnist() -> ImageDataset:
    return load_dataset(_cfg(name="mnist", image_size=28, channels=1))


def _indexed_dataset(count: int) -> ImageDataset:
    """Image i is filled with the value i, so a batch tells which examples it holds."""
    images = np.broadcast_to(np.arange(count, dtype=np.float32)[:, None, None, None],
                             (count, 2, 3, 1)).copy()
    labels = np.zeros(count, np.int32)
    return ImageDataset("indexed", images, images[:0], labels, labels[:0])


def _ids(batches) -> np.ndarray:
    return np.concatenate([b[:, 0, 0, 0] for b in batches]).astype(int)


def _take(iterator, count: int) -> list[np.ndarray]:
    return list(itertools.islice(iterator, count))


# --- embedded data sets and split ---------------------------------------------------------

def test_digits_images_are_real_and_in_range():
    images, labels = load_digits_images()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert labels.shape == (1797,) and set(np.unique(labels)) == set(range(10))


def test_digits_split_sizes_and_shape(digits):
    assert digits.image_shape == (8, 8, 1)
    assert len(digits.train) + len(digits.eval) == 1797
    assert len(digits.eval) == round(1797 * 0.1)
    assert len(digits.train_labels) == len(digits.train) and len(digits.eval_labels) == len(digits.eval)
    assert digits.train.dtype == np.float32 and -1.0 <= digits.train.min() < digits.train.max() <= 1.0


def test_split_matches_indices(digits):
    images, labels = load_digits_images()
    train_idx, eval_idx = split_indices(len(images), 0.1, 0)
    np.testing.assert_array_equal(digits.train, images[train_idx])
    np.testing.assert_array_equal(digits.eval_labels, labels[eval_idx])


def test_split_is_disjoint_covering_and_seed_controlled():
    train_idx, eval_idx = split_indices(1797, 0.1, split_seed=0)
    assert len(np.intersect1d(train_idx, eval_idx)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, eval_idx])), np.arange(1797))
    _, again_eval = split_indices(1797, 0.1, split_seed=0)
    np.testing.assert_array_equal(eval_idx, again_eval)
    assert not np.array_equal(eval_idx, split_indices(1797, 0.1, split_seed=1)[1])


def test_split_seed_defaults_to_zero(digits):
    explicit = load_dataset(_cfg(split_seed=0))
    other = load_dataset(_cfg(split_seed=3))
    np.testing.assert_array_equal(explicit.eval, digits.eval)
    assert not np.array_equal(other.eval, digits.eval)


def test_mnist_count_and_shuffled_heldout(mnist):
    assert len(mnist.train) + len(mnist.eval) == 5000
    assert mnist.image_shape == (28, 28, 1)
    assert mnist.eval.min() == -1.0 and mnist.eval.max() == 1.0
    assert len(np.unique(mnist.eval_labels[:100])) >= 8  # the source is sorted by label


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match=r"unknown data set 'cifar11'.*digits.*mnist") as info:
        load_dataset(_cfg(name="cifar11"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("field,value,words", [("image_size", 32, "image_size=32"),
                                               ("channels", 3, "channels=3")])
def test_config_shape_mismatch(field, value, words):
    with pytest.raises(ValueError, match=words):
        load_dataset(_cfg(**{field: value}))


def test_arrays_are_read_only(digits):
    with pytest.raises(ValueError):
        digits.train[0, 0, 0, 0] = 0.0


# --- training batches ----------------------------------------------------------------------

def test_batches_shape_dtype(digits):
    batch = next(train_batches(digits, 32, seed=0))
    assert batch.shape == (32, 8, 8, 1) and batch.dtype == np.float32


def test_same_seed_same_batches_different_seed_different(digits):
    first = _take(train_batches(digits, 16, seed=7, random_flip=True), 5)
    again = _take(train_batches(digits, 16, seed=7, random_flip=True), 5)
    other = _take(train_batches(digits, 16, seed=8, random_flip=True), 5)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_epochs_cover_everything_and_are_reshuffled():
    data = _indexed_dataset(40)
    ids = _ids(_take(train_batches(data, 8, seed=0), 10))  # exactly two epochs
    first, second = ids[:40], ids[40:]
    np.testing.assert_array_equal(np.sort(first), np.arange(40))
    np.testing.assert_array_equal(np.sort(second), np.arange(40))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, np.arange(40))  # actually shuffled


def test_batches_run_across_epoch_boundaries():
    data = _indexed_dataset(10)
    ids = _ids(_take(train_batches(data, 4, seed=1), 5))  # 20 examples = two epochs, no drops
    np.testing.assert_array_equal(np.sort(ids[:10]), np.arange(10))
    np.testing.assert_array_equal(np.sort(ids[10:]), np.arange(10))


def test_process_slices_are_disjoint_and_cover_once():
    data = _indexed_dataset(103)  # not divisible by 4: shards of 26, 26, 26, 25
    shards = []
    for index in range(4):
        size = len(range(index, 103, 4))
        stream = _ids(_take(train_batches(data, 5, seed=0, process_index=index, process_count=4), 6))
        epoch = stream[:size]
        assert len(np.unique(epoch)) == size
        assert set(stream) == set(epoch)  # later batches stay inside this process's slice
        shards.append(epoch)
    everything = np.concatenate(shards)
    np.testing.assert_array_equal(np.sort(everything), np.arange(103))


def test_random_flip_flips_about_half_and_keeps_pixels(digits):
    plain = np.concatenate(_take(train_batches(digits, 100, seed=3), 10))
    flipped = np.concatenate(_take(train_batches(digits, 100, seed=3, random_flip=True), 10))
    # same seed -> same order, so each example is compared with itself
    mirrored = np.all(flipped == plain[:, :, ::-1, :], axis=(1, 2, 3))
    unchanged = np.all(flipped == plain, axis=(1, 2, 3))
    assert np.all(mirrored | unchanged)
    asymmetric = ~np.all(plain == plain[:, :, ::-1, :], axis=(1, 2, 3))
    fraction = np.mean(mirrored[asymmetric] & ~unchanged[asymmetric])
    assert 0.4 < fraction < 0.6, fraction
    np.testing.assert_array_equal(np.sort(flipped.reshape(len(flipped), -1), axis=1),
                                  np.sort(plain.reshape(len(plain), -1), axis=1))


def test_iterator_state_resumes_exactly(digits):
    iterator = train_batches(digits, 64, seed=0, random_flip=True)
    _take(iterator, 30)  # past the first epoch of 26 batches
    state = iterator.get_state()
    assert state == {"next_index": 30}
    expected = _take(iterator, 3)
    resumed = train_batches(digits, 64, seed=0, random_flip=True)
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 3)):
        np.testing.assert_array_equal(a, b)


def test_batch_size_larger_than_train_set(digits):
    with pytest.raises(ValueError, match="batch_size=5000"):
        train_batches(digits, 5000, seed=0)
    with pytest.raises(ValueError, match="process_index"):
        train_batches(digits, 8, seed=0, process_index=4, process_count=4)


# --- image grids ---------------------------------------------------------------------------

def test_to_uint8_rounds_and_clips():
    out = to_uint8(np.array([-2.0, -1.0, 0.0, 1.0, 3.0, 0.999]))
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255, 255])
    assert out.dtype == np.uint8


def test_make_grid_shape_and_placement(digits):
    images = digits.train[:10]
    grid = make_grid(images, nrow=5, padding=1, scale=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * (16 + 1) + 1, 5 * (16 + 1) + 1, 1)
    # the 7th image (row 1, column 1) lands where expected, upsampled by pixel repetition
    tile = grid[1 + 17:1 + 17 + 16, 1 + 17:1 + 17 + 16]
    np.testing.assert_array_equal(tile, to_uint8(images[6]).repeat(2, 0).repeat(2, 1))


def test_save_grid_writes_readable_png(tmp_path, digits):
    path = tmp_path / "nested" / "dir" / "grid.png"
    save_grid(digits.train[:10], path, nrow=5)  # default scale 4: 8 px -> 32 px
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size == (5 * 33 + 1, 2 * 33 + 1)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary left behind
