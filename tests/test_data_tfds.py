"""Data sets on disk: tfds ArrayRecord sets (mocked and genuinely prepared) and image folders.

Nothing here may reach the network: a tfds download attempt would stall for minutes here. An
autouse guard makes every socket connection and every tfds download fail at once instead.
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket

import ml_collections
import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from ddsm_jax.data.pipeline import (  # noqa: E402
    DataError,
    DataNotFoundError,
    ImageDataset,
    LazyImages,
    load_dataset,
    train_batches,
)


class NetworkUsedError(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail fast and loudly on any download or connection instead of stalling on retries."""

    def refuse(*args, **kwargs):
        raise NetworkUsedError("tests must not use the network or download a data set")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    manager = tfds.download.DownloadManager
    for method in ("download", "download_and_extract", "download_kaggle_data"):
        if hasattr(manager, method):
            monkeypatch.setattr(manager, method, refuse)


def _cfg(name: str, data_dir, **fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": name, "data_dir": str(data_dir), "eval_fraction": 0.1,
                                      "channels": 3, **fields})


def _stream(dataset: ImageDataset, batch_size: int, count: int, **kwargs) -> np.ndarray:
    return np.concatenate(list(itertools.islice(train_batches(dataset, batch_size, **kwargs), count)))


def _index_of(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Which reference image each image is (exact match), -1 for none."""
    flat_ref = reference.reshape(len(reference), -1)
    found = []
    for image in images.reshape(len(images), -1):
        hits = np.flatnonzero(np.all(flat_ref == image, axis=1))
        found.append(hits[0] if len(hits) == 1 else -1)
    return np.asarray(found)


# --- tfds, mocked ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,size,raw_shape", [("cifar10", 32, (32, 32, 3)),
                                                 ("celeb_a", 64, (218, 178, 3)),
                                                 ("lsun/bedroom", 16, None),
                                                 ("imagenet64", 64, (64, 64, 3))])
def test_mocked_tfds_shapes_and_range(tmp_path, name, size, raw_shape):
    with tfds.testing.mock_data(num_examples=6):
        dataset = load_dataset(_cfg(name, tmp_path, image_size=size))
        raw = tfds.data_source(dataset_name(name), split="train", data_dir=str(tmp_path), download=False)
        if raw_shape is not None:
            assert raw[0]["image"].shape == raw_shape
        assert isinstance(dataset.train, LazyImages) and isinstance(dataset.eval, LazyImages)
        assert len(dataset.train) == 6 and len(dataset.eval) == 6
        assert dataset.image_shape == (size, size, 3)
        assert dataset.train_labels is None
        image = dataset.train[0]
        assert image.shape == (size, size, 3) and image.dtype == np.float32
        block = dataset.eval[:4]
        assert block.shape == (4, size, size, 3) and block.dtype == np.float32
        assert -1.0 <= block.min() < block.max() <= 1.0
        assert block.max() - block.min() > 1.0  # random mock pixels span most of the range
        np.testing.assert_array_equal(dataset.train[-1], dataset.train[5])
        batch = next(train_batches(dataset, 3, seed=0, random_flip=True))
        assert batch.shape == (3, size, size, 3) and batch.dtype == np.float32


def dataset_name(name: str) -> str:
    return "imagenet_resized/64x64" if name == "imagenet64" else name


def test_celeb_a_is_center_cropped_to_140_then_resized(tmp_path):
    """The 140x140 centre of a 218x178 image is white and the rest black: only the crop is kept."""
    raw = np.zeros((218, 178, 3), np.uint8)
    top, left = (218 - 140) // 2, (178 - 140) // 2
    raw[top:top + 140, left:left + 140] = 255
    raw[top:top + 140, left:left + 70, 0] = 0  # left half of the crop has no red: checks orientation

    def as_data_source(self, split, **kwargs):
        return [[{"image": raw}] * 3 for _ in split]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        dataset = load_dataset(_cfg("celeb_a", tmp_path, image_size=64))
        image = dataset.train[0]
    assert image.shape == (64, 64, 3)
    np.testing.assert_allclose(image[..., 1:], 1.0)  # no black border survives in green/blue
    np.testing.assert_allclose(image[:, :31, 0], -1.0)
    np.testing.assert_allclose(image[:, 33:, 0], 1.0)


def test_mocked_tfds_process_slices_cover_train_split_once(tmp_path):
    count, processes, batch = 22, 4, 3  # shards of 6, 6, 5, 5
    with tfds.testing.mock_data(num_examples=count):
        dataset = load_dataset(_cfg("cifar10", tmp_path, image_size=32))
        reference = dataset.train[:]
        assert len(np.unique(reference.reshape(count, -1), axis=0)) == count  # images tell indices
        seen = []
        for index in range(processes):
            size = len(range(index, count, processes))
            ids = _index_of(_stream(dataset, batch, 4, seed=0, process_index=index,
                                    process_count=processes), reference)
            assert np.all(ids >= 0)
            epoch = ids[:size]
            assert len(np.unique(epoch)) == size
            assert set(ids) == set(epoch)  # later batches stay inside this process's slice
            np.testing.assert_array_equal(np.sort(epoch), np.arange(index, count, processes))
            seen.append(epoch)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(count))


def test_mocked_tfds_shuffling_is_deterministic_and_resumable(tmp_path):
    with tfds.testing.mock_data(num_examples=20):
        dataset = load_dataset(_cfg("cifar10", tmp_path, image_size=32))
        first = _stream(dataset, 4, 8, seed=5, random_flip=True)
        again = _stream(dataset, 4, 8, seed=5, random_flip=True)
        other = _stream(dataset, 4, 8, seed=6, random_flip=True)
        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, other)
        ids = _index_of(_stream(dataset, 4, 5, seed=5), dataset.train[:])
        np.testing.assert_array_equal(np.sort(ids), np.arange(20))  # one epoch, every image once
        assert not np.array_equal(ids, np.arange(20))

        iterator = train_batches(dataset, 4, seed=5, random_flip=True)
        list(itertools.islice(iterator, 6))  # past the first epoch of 5 batches
        state = iterator.get_state()
        assert state == {"next_index": 6}
        resumed = train_batches(dataset, 4, seed=5, random_flip=True)
        resumed.set_state(state)
        np.testing.assert_array_equal(next(resumed), next(iterator))


# --- tfds, genuinely prepared as ArrayRecord (no TensorFlow needed) --------------------------

class _TinyCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A real cifar10-named ArrayRecord build from PNG files: exercises tfds's own reader,
    dataset_info and image decoding, which mock_data replaces."""

    name = "cifar10"
    VERSION = tfds.core.Version("3.0.2")
    png_dir = None
    # Nothing to download. Also keeps tfds from locating a checksums file next to this module,
    # which needs the `importlib_resources` backport for a module inside a package.
    url_infos = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        files = sorted(self.png_dir.glob("*.png"))
        return {"train": self._generate_examples(files[:10]), "test": self._generate_examples(files[10:])}

    def _generate_examples(self, files):
        for i, path in enumerate(files):
            yield path.stem, {"id": path.stem, "image": str(path), "label": i % 10}


@pytest.fixture(scope="module")
def prepared_cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    png_dir = root / "png"
    png_dir.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(png_dir / f"{i:02d}.png")
    _TinyCifar10.png_dir = png_dir
    builder = _TinyCifar10(data_dir=str(root / "tfds"), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return root / "tfds", pixels


def test_prepared_array_record_cifar10_reads_the_real_images(prepared_cifar10):
    data_dir, pixels = prepared_cifar10
    dataset = load_dataset(_cfg("cifar10", data_dir, image_size=32))
    assert len(dataset.train) == 10 and len(dataset.eval) == 3  # tfds's own train/test splits
    expected = pixels.astype(np.float32) / np.float32(127.5) - 1.0
    train_ids = _index_of(dataset.train[:], expected)
    eval_ids = _index_of(dataset.eval[:], expected)
    np.testing.assert_array_equal(np.sort(train_ids), np.arange(10))  # lossless PNG round trip
    np.testing.assert_array_equal(np.sort(eval_ids), np.arange(10, 13))
    ids = _index_of(_stream(dataset, 5, 2, seed=0), expected)
    np.testing.assert_array_equal(np.sort(ids), np.arange(10))


def test_tfrecord_build_is_reported_as_unprepared(prepared_cifar10, tmp_path):
    """A build in tfrecord format (tfds's default) cannot be read by random access: say so."""
    source, _ = prepared_cifar10
    data_dir = tmp_path / "tfds"
    shutil.copytree(source / "cifar10", data_dir / "cifar10")
    info_path = data_dir / "cifar10" / "3.0.2" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataNotFoundError) as error:
        load_dataset(_cfg("cifar10", data_dir))
    message = str(error.value)
    assert "\n" not in message and "only as tfrecord" in message
    assert f"tfds build cifar10 --data_dir={data_dir} --file_format=array_record" in message


# --- missing data -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,command", [
    ("cifar10", "tfds build cifar10 --data_dir={} --file_format=array_record"),
    ("celeb_a", "tfds build celeb_a --data_dir={} --file_format=array_record"),
    ("imagenet64", "tfds build imagenet_resized/64x64 --data_dir={} --file_format=array_record"),
    ("lsun/bedroom", "tfds build lsun/bedroom --data_dir={} --file_format=array_record"),
])
def test_missing_tfds_data_set_says_how_to_prepare_it(tmp_path, name, command):
    data_dir = tmp_path / "empty"
    with pytest.raises(DataNotFoundError) as info:
        load_dataset(_cfg(name, data_dir))
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in message
    assert f"data set {name!r}" in message
    assert f"data_dir {str(data_dir)!r}" in message
    assert command.format(data_dir) in message
    assert "pip install tensorflow tensorflow-datasets" in message
    assert not data_dir.exists()  # nothing was prepared or downloaded into it


def test_missing_data_dir_defaults_to_tfds_default(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "default"))
    config = ml_collections.ConfigDict({"name": "cifar10", "eval_fraction": 0.1})
    with pytest.raises(DataNotFoundError, match=f"--data_dir={tmp_path / 'default'} "):
        load_dataset(config)


# --- image folders (afhq) --------------------------------------------------------------------

def _write_afhq(root, with_val: bool = True) -> None:
    colours = {"cat": (255, 0, 0), "dog": (0, 255, 0), "wild": (0, 0, 255)}
    layout = {"train": {"cat": 3, "dog": 2, "wild": 1}}
    if with_val:
        layout["val"] = {"cat": 1, "dog": 1}
    for split, classes in layout.items():
        for label, count in classes.items():
            folder = root / "afhq" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                size = (40, 30) if i % 2 else (24, 24)  # non-square and square sources
                picture = Image.new("RGB", size, colours[label])
                if i == 1:
                    picture.convert("RGBA").save(folder / f"{i}.png")  # alpha is dropped
                else:
                    picture.save(folder / f"{i}.png")
    (root / "afhq" / "train" / "cat" / "notes.txt").write_text("not an image")


def test_afhq_image_folder(tmp_path):
    _write_afhq(tmp_path)
    (tmp_path / "afhq" / "train" / "wild" / "0.png").unlink()
    Image.new("L", (20, 20), 255).save(tmp_path / "afhq" / "train" / "wild" / "0.jpg")
    dataset = load_dataset(_cfg("afhq", tmp_path, image_size=16))
    assert isinstance(dataset.train, LazyImages)
    assert len(dataset.train) == 6 and len(dataset.eval) == 2
    assert dataset.image_shape == (16, 16, 3)
    np.testing.assert_array_equal(dataset.train_labels, [0, 0, 0, 1, 1, 2])  # sorted class folders
    np.testing.assert_array_equal(dataset.eval_labels, [0, 1])
    images = dataset.train[:]
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.float32
    np.testing.assert_allclose(images[0], np.broadcast_to([1.0, -1.0, -1.0], (16, 16, 3)))
    np.testing.assert_allclose(images[3], np.broadcast_to([-1.0, 1.0, -1.0], (16, 16, 3)))
    np.testing.assert_allclose(images[5], 1.0, atol=1e-2)  # grayscale JPEG -> white RGB
    batch = next(train_batches(dataset, 3, seed=0, random_flip=True, process_index=1, process_count=2))
    assert batch.shape == (3, 16, 16, 3)


@pytest.mark.parametrize("partial", [False, True])
def test_missing_afhq_says_where_to_put_it(tmp_path, partial):
    data_dir = tmp_path / "data"
    if partial:
        _write_afhq(data_dir, with_val=False)  # train present, val missing
    else:
        data_dir.mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_dataset(_cfg("afhq", data_dir))
    message = str(info.value)
    assert "\n" not in message
    assert "data set 'afhq'" in message and f"data_dir {str(data_dir)!r}" in message
    assert f"{data_dir}/afhq/train/<class>/*.jpg" in message
    assert f"{data_dir}/afhq/val/<class>/*.jpg" in message
    assert str(data_dir / "afhq" / "val") in message.split("put the images")[0]


def test_config_channels_mismatch_for_tfds_set(tmp_path):
    with tfds.testing.mock_data(num_examples=2), pytest.raises(ValueError, match="channels=1"):
        load_dataset(_cfg("cifar10", tmp_path, channels=1))


# --- damaged data -----------------------------------------------------------------------------

def _damaged_copy(prepared_cifar10, tmp_path, damage) -> str:
    source, _ = prepared_cifar10
    data_dir = tmp_path / "tfds"
    shutil.copytree(source / "cifar10", data_dir / "cifar10")
    damage(data_dir / "cifar10" / "3.0.2")
    return data_dir


def _garbage_info(folder):
    (folder / "dataset_info.json").write_text("{ this is not json")


def _random_records(folder):
    rng = np.random.default_rng(1)
    for path in folder.glob("*.array_record*"):
        path.write_bytes(rng.integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("damage,what", [(_garbage_info, "dataset_info.json"),
                                         (_random_records, "array_record")])
def test_damaged_data_set_is_one_line_naming_the_data_set(prepared_cifar10, tmp_path, damage, what):
    data_dir = _damaged_copy(prepared_cifar10, tmp_path, damage)
    with pytest.raises(DataError) as error:
        load_dataset(_cfg("cifar10", data_dir, image_size=32))
    message = str(error.value)
    assert "\n" not in message and "'cifar10'" in message and str(data_dir) in message, message
    assert what in message and "tfds build cifar10" in message, message
