"""Input pipeline: the data-set registry, a fixed held-out split and grain training batches.

Every data set (embedded arrays, prepared tfds data sets, image folders) goes through
`load_dataset` and `train_batches`, so training code does not care where the images come from.
"""

from __future__ import annotations

import functools

import grain
import ml_collections
import numpy as np

from ddsm_jax.data import embedded
from ddsm_jax.data.preprocess import crop_then_resize, resize_shorter_then_crop
from ddsm_jax.data.sources import (  # noqa: F401 - re-exported: the data layer's public names
    DataError,
    DataNotFoundError,
    DatasetSpec,
    EmbeddedData,
    ImageDataset,
    ImageFolderData,
    ImageSource,
    LazyImages,
    TfdsData,
    read_threads,
    split_indices,
)

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
    threads = read_threads(lazy=lazy)
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(4, threads))
    return iter(ds.to_iter_dataset(read_options))
