"""Feature statistics as pytorch-fid `.npz` files, and the FD between two of them.

    # reference statistics of a data set's training split
    python -m ddsm_jax.eval.stats --config=configs/cifar10.py --out=cifar10_train.npz \\
        --config.eval.inception_weights=inception_fid.npz --config.data.data_dir=DATA
    # statistics of exported samples (uint8 NHWC under arr_0), and their FD to the reference
    python -m ddsm_jax.eval.stats --config=configs/cifar10.py --images=DIR/export/samples.npz \\
        --out=samples.npz --compare=cifar10_train.npz --config.eval.inception_weights=...

The files hold `mu` and `sigma` exactly as pytorch-fid writes them, so `python -m pytorch_fid
a.npz b.npz` reads ours and we read published ones (`--config.eval.reference_stats`).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from ddsm_jax.utils.cli import run_program

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Where to write the statistics (.npz).")
_IMAGES = flags.DEFINE_string("images", None, "An .npz (arr_0) or .npy of images, uint8 NHWC or "
                              "float in [-1, 1]; default: the data set's training split.")
_COMPARE = flags.DEFINE_string("compare", None, "Statistics (.npz) to print the FD against.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/stats", "Cache of the domain classifier.")


def load_images(path: str) -> np.ndarray:
    from ddsm_jax.eval.features import as_float_images

    try:
        with epath.Path(path).open("rb") as handle:
            loaded = np.load(handle)
            images = loaded["arr_0"] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot read images from {path} (an .npz with arr_0 or an .npy): "
                         f"{error}") from error
    if images.ndim != 4:
        raise ValueError(f"{path}: expected NHWC images, got shape {images.shape}")
    return as_float_images(images)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ddsm_jax.data.pipeline import load_dataset
    from ddsm_jax.eval.feature_space import feature_extractor
    from ddsm_jax.eval.features import compute_features
    from ddsm_jax.eval.metrics import (
        feature_statistics,
        frechet_distance,
        load_statistics,
        save_statistics,
    )
    from ddsm_jax.utils.compilation_cache import enable_compilation_cache

    enable_compilation_cache()
    config = _CONFIG.value
    try:
        extractor, _ = feature_extractor(config, _WORKDIR.value)
        if _IMAGES.value:
            images, limit = load_images(_IMAGES.value), None
        else:
            images, limit = load_dataset(config.data).train, int(config.eval.num_reference)
        features = compute_features(extractor, images, batch_size=config.eval.feature_batch_size,
                                    limit=limit, progress=True)
        mu, sigma = feature_statistics(features)
        save_statistics(_OUT.value, mu, sigma)
        report = {"out": _OUT.value, "features": extractor.name, "num_images": len(features)}
        if _COMPARE.value:
            report["fd"] = frechet_distance(mu, sigma, *load_statistics(_COMPARE.value))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(report))


if __name__ == "__main__":
    run_program(main, required=["config", "out"])
