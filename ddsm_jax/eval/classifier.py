"""The domain feature network: a small digit classifier whose penultimate layer is the space for
the Fréchet distance and KID of generated digits.

Inception features of 8x8 or 28x28 grey digits say little about digit quality, so the embedded
sets (digits, MNIST) are judged in the feature space of a CNN trained on their own labelled
training split. Training is seeded and deterministic, takes under a minute on a 2-core CPU, and
its weights are cached in the workdir keyed by everything that changes them, so every
evaluation of a data set measures in the same space. Keep the cache with the workdir: a
retraining is bitwise the same only on the same machine and XLA device set-up (XLA:CPU's
convolution rounding depends on its thread partitioning; e.g. 1 vs 8 host devices differ).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
import zipfile
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from tqdm import tqdm

from ddsm_jax.common_types import Params, PathLike
from ddsm_jax.data.pipeline import DATASETS, EmbeddedData, ImageDataset, load_dataset
from ddsm_jax.eval.features import FeatureExtractor
from ddsm_jax.layout import Workdir
from ddsm_jax.utils.files import read_json, write_atomically, write_json

NUM_CLASSES = 10
# Bump when the architecture or training code changes what a given config and seed produce,
# so that old caches are not silently reused.
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
    """Architecture and training of the classifier; all of it goes into the cache key."""

    # per stage: 3x3 convs, then a 2x2 max-pool (none after the last stage or below 2x2)
    channels: tuple[int, ...] = (16, 32, 64, 128)
    convs_per_stage: int = 1
    pool_grid: int = 2  # average-pool the last map to a pool_grid x pool_grid grid (1: global)
    feature_dim: int = 128  # the penultimate layer: the feature space of FD and KID
    num_groups: int = 8  # GroupNorm (0: none): no batch statistics, train and eval agree
    batch_size: int = 128
    # A fixed step count, not epochs: 350 steps are ~28 epochs of the 1,617 digits (which need
    # them: 10 epochs gave 96-97% held out, 25 gave 97-99%) and ~10 epochs of MNIST's 4,500.
    num_steps: int = 350
    learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    max_shift: float = 0.1  # random shift of up to this fraction of the image size, rounded

    def shift(self, image_size: int) -> int:
        return round(self.max_shift * image_size)


class DigitClassifier(nnx.Module):
    """Conv stages (3x3 conv, GroupNorm, SiLU, 2x2 max-pool), an average pool of the last map to
    a fixed grid, a feature layer and a 10-way head.

    Pooling to a fixed grid rather than to one vector keeps the coarse layout of the strokes
    and still makes any image size work (8x8 digits, 28x28 MNIST): on MNIST a 2x2 grid
    reached 97.8% where a global average pool reached 95.6% in the same 6 epochs.
    """

    def __init__(self, settings: ClassifierSettings, in_channels: int, *, rngs: nnx.Rngs):
        convs, norms = [], []
        previous = in_channels
        for channels in settings.channels:
            for _ in range(settings.convs_per_stage):
                convs.append(nnx.Conv(previous, channels, (3, 3), padding="SAME", rngs=rngs))
                norms.append(nnx.GroupNorm(channels, num_groups=settings.num_groups, rngs=rngs)
                             if settings.num_groups else None)
                previous = channels
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.num_stages = len(settings.channels)
        self.convs_per_stage = settings.convs_per_stage
        self.pool_grid = settings.pool_grid
        self.feature = nnx.Linear(previous * settings.pool_grid ** 2, settings.feature_dim,
                                  rngs=rngs)
        self.head = nnx.Linear(settings.feature_dim, NUM_CLASSES, rngs=rngs)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(logits, features) of float32 NHWC images in [-1, 1]."""
        x = images
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = conv(x)
            x = jax.nn.silu(norm(x) if norm is not None else x)
            stage, last_in_stage = divmod(index + 1, self.convs_per_stage)
            if last_in_stage == 0 and stage < self.num_stages and min(x.shape[1:3]) > 2:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        features = jax.nn.silu(self.feature(adaptive_average_pool(x, self.pool_grid)))
        return self.head(features), features


def adaptive_average_pool(x: jax.Array, grid: int) -> jax.Array:
    """(N, H, W, C) -> (N, grid * grid * C): means over a grid x grid partition of the map
    (PyTorch's adaptive pooling regions), so any image size gives the same feature width."""
    height, width = x.shape[1:3]
    cells = []
    for i in range(grid):
        for j in range(grid):
            rows = slice(i * height // grid, -(-(i + 1) * height // grid))
            cols = slice(j * width // grid, -(-(j + 1) * width // grid))
            cells.append(x[:, rows, cols].mean(axis=(1, 2)))
    return jnp.concatenate(cells, axis=-1)


@dataclasses.dataclass(frozen=True)
class Classifier:
    """The static part of the classifier (its graph); the weights are a plain nested dict."""

    graphdef: Any
    settings: ClassifierSettings
    image_shape: tuple[int, int, int]

    def apply(self, params: Params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(logits (N, 10), features (N, feature_dim)); pure, so jittable and differentiable."""
        chex.assert_rank(images, 4)
        chex.assert_equal(images.shape[-1], self.image_shape[-1])
        logits, features = nnx.merge(self.graphdef, params)(images.astype(jnp.float32))
        chex.assert_shape(logits, (images.shape[0], NUM_CLASSES))
        return logits, features

    def features(self, params: Params, images: jax.Array) -> jax.Array:
        return self.apply(params, images)[1]


def build_classifier(settings: ClassifierSettings,
                     image_shape: tuple[int, int, int]) -> tuple[Classifier, Params]:
    """The classifier and the shapes of its weights, without computing any (for loading)."""
    image_shape = tuple(int(d) for d in image_shape)
    abstract = nnx.eval_shape(lambda: DigitClassifier(settings, image_shape[-1], rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return Classifier(graphdef, settings, image_shape), nnx.to_pure_dict(state)


def init_classifier(settings: ClassifierSettings, image_shape: tuple[int, int, int],
                    key: jax.Array) -> tuple[Classifier, Params]:
    """The classifier and its initial weights (initialised under jit, as the U-Net is)."""
    classifier, _ = build_classifier(settings, image_shape)

    @jax.jit
    def init(key: jax.Array) -> Params:
        module = DigitClassifier(settings, classifier.image_shape[-1], rngs=nnx.Rngs(params=key))
        return nnx.to_pure_dict(nnx.state(module, nnx.Param))

    return classifier, init(key)


# --- training -----------------------------------------------------------------------------------

def random_shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """Shifts each image by up to `max_shift` pixels in each direction (pad with the background
    value -1, then crop). Digits stay digits under small shifts; a mirrored digit is not one."""
    batch, height, width, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                     constant_values=-1.0)
    offsets = jax.random.randint(key, (batch, 2), 0, 2 * max_shift + 1)
    crop = lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
    return jax.vmap(crop)(padded, offsets)


def _optimizer(settings: ClassifierSettings, num_steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.learning_rate, max(1, int(settings.warmup_fraction * num_steps)), num_steps)
    return optax.adamw(schedule, weight_decay=settings.weight_decay)


def _batch_indices(num_train: int, batch_size: int, num_steps: int, seed: int) -> np.ndarray:
    """(num_steps, batch_size) training indices: seeded reshuffles, one per epoch, run across
    epoch boundaries so that every image is seen equally often."""
    rng = np.random.default_rng(seed)
    epochs = math.ceil(num_steps * batch_size / num_train)
    order = np.concatenate([rng.permutation(num_train) for _ in range(epochs)])
    return order[:num_steps * batch_size].reshape(num_steps, batch_size).astype(np.int32)


def train_classifier(dataset: ImageDataset, settings: ClassifierSettings = ClassifierSettings(),
                     *, seed: int = 0, progress: bool = True) -> tuple[Classifier, Params]:
    """Trains on `dataset.train` with its labels; the same data, settings and seed give bitwise
    the same weights on the same machine and device set-up (seeded init, host-side batch
    order, augmentation keyed by step)."""
    if dataset.train_labels is None:
        raise ValueError(_unlabelled_message(dataset.name))
    images = jnp.asarray(np.asarray(dataset.train, np.float32))
    labels = jnp.asarray(np.asarray(dataset.train_labels, np.int32))
    chex.assert_rank(images, 4)
    chex.assert_shape(labels, (images.shape[0],))
    num_train = images.shape[0]
    batch_size = min(settings.batch_size, num_train)
    num_steps = settings.num_steps
    key = jax.random.key(seed)
    classifier, params = init_classifier(settings, images.shape[1:], jax.random.fold_in(key, 0))
    optimizer = _optimizer(settings, num_steps)
    opt_state = optimizer.init(params)
    shift = settings.shift(images.shape[1])
    augment_key = jax.random.fold_in(key, 1)

    def loss_fn(params: Params, batch: jax.Array,
                batch_labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits, _ = classifier.apply(params, batch)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()
        return loss, (logits.argmax(-1) == batch_labels).mean()

    @jax.jit
    def train_step(params: Params, opt_state: Any, images: jax.Array, labels: jax.Array,
                   step: jax.Array,
                   batch_indices: jax.Array) -> tuple[Params, Any, jax.Array, jax.Array]:
        # One step per call: XLA:CPU runs convolutions inside a `lax.scan` loop body several
        # times slower than at top level (measured 5-6x), so scanning steps would cost speed.
        batch = random_shift(images[batch_indices], jax.random.fold_in(augment_key, step), shift)
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, labels[batch_indices])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    order = _batch_indices(num_train, batch_size, num_steps, seed)
    # Compiled before the progress bar starts, so that its rate and ETA leave compilation out.
    train_step = train_step.lower(params, opt_state, images, labels, jnp.int32(0),
                                  jnp.asarray(order[0])).compile()
    with tqdm(total=num_steps, desc=f"classifier {dataset.name}", unit="step",
              disable=not progress) as bar:
        for step in range(num_steps):
            params, opt_state, loss, accuracy = train_step(
                params, opt_state, images, labels, jnp.int32(step), jnp.asarray(order[step]))
            bar.update(1)
            if step % 20 == 0 or step == num_steps - 1:
                bar.set_postfix(loss=f"{float(loss):.4f}", acc=f"{float(accuracy):.3f}")
    return classifier, params


def held_out_accuracy(classifier: Classifier, params: Params, images: np.ndarray,
                      labels: np.ndarray, *, batch_size: int = 500) -> float:
    """Top-1 accuracy on held-out images, in fixed-size batches (one compile)."""
    chex.assert_shape(labels, (len(images),))
    batch_size = max(1, min(batch_size, len(images)))
    predict = jax.jit(lambda params, batch: classifier.apply(params, batch)[0].argmax(-1))
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start:start + batch_size], np.float32)
        count = len(batch)
        if count < batch_size:  # pad the last batch to the compiled shape
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)])
        predictions = np.asarray(predict(params, batch))[:count]
        correct += int((predictions == labels[start:start + count]).sum())
    return correct / max(1, len(images))


# --- the cached extractor -----------------------------------------------------------------------

def _labelled_datasets() -> list[str]:
    """The embedded sets: in memory with their labels (tfds and folder sets are read unlabelled)."""
    return [name for name, spec in DATASETS.items() if isinstance(spec, EmbeddedData)]


def _unlabelled_message(name: str) -> str:
    return (f"the domain feature network is only for the labelled embedded data sets "
            f"({', '.join(_labelled_datasets())}); "
            f"{name!r} has no labels here. Paper data sets use Inception FID: set "
            f"--config.eval.features=inception and --config.eval.inception_weights=FILE")


def cache_key(config: ml_collections.ConfigDict, settings: ClassifierSettings, seed: int) -> str:
    """A hash of everything that changes the trained weights: the data set and its held-out
    split, the image shape, the architecture and training settings, the seed, the code version."""
    data = config.data
    facts = {
        "version": CACHE_VERSION,
        "data": {"name": data.name, "image_size": data.get("image_size", None),
                 "channels": data.get("channels", None),
                 "eval_fraction": float(data.get("eval_fraction", 0.0)),
                 "split_seed": data.get("split_seed", None)},
        "settings": dataclasses.asdict(settings),
        "seed": int(seed),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def cache_paths(config: ml_collections.ConfigDict, workdir: PathLike,
                settings: ClassifierSettings = ClassifierSettings(),
                seed: int = 0) -> tuple[epath.Path, epath.Path]:
    """(weights .npz, info .json) of this config's classifier under `<workdir>/eval/classifier`."""
    stem = f"{config.data.name.replace('/', '_')}_{cache_key(config, settings, seed)}"
    directory = Workdir(workdir).classifier
    return directory / f"{stem}.npz", directory / f"{stem}.json"


def _flatten(params: Params, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for name, value in params.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{path}/"))
        else:
            flat[path] = np.asarray(value)
    return flat


def _unflatten_like(flat: dict[str, np.ndarray], template: Params, prefix: str = "") -> Params:
    """Rebuilds the nested dict in `template`'s structure, checking every shape and dtype."""
    params = {}
    for name, value in template.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict):
            params[name] = _unflatten_like(flat, value, f"{path}/")
            continue
        array = flat.pop(path)  # KeyError: a missing weight
        if array.shape != tuple(value.shape) or array.dtype != value.dtype:
            raise ValueError(f"{path} is {array.dtype}{list(array.shape)}, expected "
                             f"{value.dtype}{list(value.shape)}")
        params[name] = jnp.asarray(array)
    if not prefix and flat:
        raise ValueError(f"unexpected weights {sorted(flat)}")
    return params


def _load_cache(weights_path: epath.Path, info_path: epath.Path,
                template: Params) -> tuple[Params, dict]:
    with weights_path.open("rb") as handle, np.load(handle, allow_pickle=False) as data:
        flat = {name: data[name] for name in data.files}
    params = _unflatten_like(flat, template)
    info = read_json(info_path)
    if not isinstance(info, dict) or "test_accuracy" not in info:
        raise ValueError("no test_accuracy in the info file")
    return params, info


def domain_extractor(config: ml_collections.ConfigDict, workdir: PathLike, *, seed: int = 0,
                     progress: bool = True,
                     settings: ClassifierSettings = ClassifierSettings(),
                     ) -> tuple[FeatureExtractor, dict[str, Any]]:
    """The classifier's penultimate-layer features as a `FeatureExtractor`, and facts about it:
    `{"dataset", "test_accuracy", "train_seconds", "feature_dim", "num_train", "num_test",
    "seed", "settings"}` as recorded when it was trained, plus `from_cache` and `cache` (the
    weights file). `train_seconds` includes compilation.

    Trains once per (data, held-out split, settings, seed) and caches the weights and facts in
    `<workdir>/eval/classifier/<dataset>_<hash>.{npz,json}`; later calls read the cache without
    loading the data. A damaged cache is retrained with a warning and replaced (training is
    deterministic, so on the machine that made it the replacement is the same network); our
    own writes are atomic, so damage comes from outside (an interrupted copy, a full disk).
    Only labelled embedded sets
    (digits, MNIST) have a domain network; other sets raise ValueError.
    """
    name = config.data.name
    if name not in _labelled_datasets():
        raise ValueError(_unlabelled_message(name))
    image_shape = (int(config.data.image_size), int(config.data.image_size),
                   int(config.data.channels))
    weights_path, info_path = cache_paths(config, workdir, settings, seed)

    params = info = None
    from_cache = False
    if weights_path.is_file() and info_path.is_file():
        classifier, template = build_classifier(settings, image_shape)
        try:
            params, info = _load_cache(weights_path, info_path, template)
            from_cache = True
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            warnings.warn(f"damaged classifier cache {weights_path} ({type(error).__name__}: "
                          f"{error}); retraining and replacing it", RuntimeWarning, stacklevel=2)
    if params is None:
        dataset = load_dataset(config.data)
        if dataset.train_labels is None or dataset.eval_labels is None:
            raise ValueError(_unlabelled_message(name))
        start = time.perf_counter()
        classifier, params = train_classifier(dataset, settings, seed=seed, progress=progress)
        params = jax.block_until_ready(params)
        train_seconds = time.perf_counter() - start
        info = {
            "dataset": name,
            "test_accuracy": held_out_accuracy(classifier, params, dataset.eval,
                                               dataset.eval_labels),
            "train_seconds": round(train_seconds, 2),
            "feature_dim": settings.feature_dim,
            "num_train": len(dataset.train),
            "num_test": len(dataset.eval),
            "seed": int(seed),
            "settings": dataclasses.asdict(settings),
        }
        flat = _flatten(params)
        write_atomically(weights_path, lambda f: np.savez(f, **flat))
        write_json(info_path, info, indent=2)

    extractor = FeatureExtractor(name=f"classifier_{name}", dim=settings.feature_dim,
                                 params=params, apply_fn=classifier.features)
    return extractor, {**info, "from_cache": from_cache, "cache": str(weights_path)}
