"""Which feature space a config is judged in, and the real data's statistics in it.

Embedded digit sets are judged by the project's domain classifier (Inception features of 8x8
grey digits mean little); every other data set by the FID Inception network, whose weights the
user supplies. Reference features of the training split are cached in the workdir, because on a
paper data set they cost as much as the evaluation itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import ml_collections
import numpy as np

from ddsm_jax.common_types import PathLike
from ddsm_jax.data.pipeline import load_dataset
from ddsm_jax.eval.features import FeatureExtractor, compute_features
from ddsm_jax.eval.metrics import feature_statistics, frechet_distance, load_statistics
from ddsm_jax.layout import Workdir
from ddsm_jax.utils.files import write_atomically

DOMAIN_DATASETS = ("digits", "mnist")


def feature_extractor(config: ml_collections.ConfigDict,
                      workdir: PathLike) -> tuple[FeatureExtractor, dict[str, Any]]:
    """The extractor for `config.eval.features` ('auto', 'domain' or 'inception') and its facts."""
    kind = config.eval.features
    if kind == "auto":
        kind = "domain" if config.data.name in DOMAIN_DATASETS else "inception"
    if kind == "domain":
        from ddsm_jax.eval.classifier import domain_extractor

        return domain_extractor(config, workdir)
    if kind == "inception":
        from ddsm_jax.eval.inception import inception_extractor

        if not config.eval.inception_weights:
            raise FileNotFoundError(
                "FID needs the Inception weights: convert pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth with `python -m "
                "ddsm_jax.eval.convert_inception --pth=FILE --out=inception_fid.npz` and pass "
                "--config.eval.inception_weights=inception_fid.npz (see README, Evaluation)")
        return inception_extractor(config.eval.inception_weights), {
            "weights": str(config.eval.inception_weights)}
    raise ValueError(f"config.eval.features must be 'auto', 'domain' or 'inception', got {kind!r}")


@dataclasses.dataclass(frozen=True)
class Reference:
    """Real-data statistics; `features` (for KID) is None when only published stats are known."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    source: str

    def frechet_distance(self, features: np.ndarray) -> float:
        """FD between the Gaussian fitted to `features` (N, dim) and the real data's."""
        return frechet_distance(*feature_statistics(features), self.mu, self.sigma)


def reference_statistics(config: ml_collections.ConfigDict, extractor: FeatureExtractor,
                         workdir: PathLike, *, progress: bool = True) -> Reference:
    """Published statistics when `config.eval.reference_stats` is set, else (cached) features of
    up to `config.eval.num_reference` training images."""
    if config.eval.reference_stats:
        mu, sigma = load_statistics(config.eval.reference_stats)
        if mu.shape[0] != extractor.dim:
            raise ValueError(f"{config.eval.reference_stats} has {mu.shape[0]}-d statistics but "
                             f"the {extractor.name} features are {extractor.dim}-d")
        return Reference(mu, sigma, None, str(config.eval.reference_stats))
    key = _reference_key(config, extractor)
    cache = Workdir(workdir).eval / f"reference_{config.data.name.replace('/', '_')}_{key}.npz"
    if cache.is_file():
        try:
            with cache.open("rb") as handle, np.load(handle) as data:
                return Reference(data["mu"], data["sigma"], data["features"], str(cache))
        except (KeyError, ValueError, OSError):
            pass  # a damaged cache is recomputed, and then replaced atomically
    features = compute_features(extractor, load_dataset(config.data).train,
                                batch_size=config.eval.feature_batch_size,
                                limit=int(config.eval.num_reference), progress=progress)
    mu, sigma = feature_statistics(features)
    write_atomically(cache, lambda handle: np.savez(handle, mu=mu, sigma=sigma,
                                                    features=features.astype(np.float32)))
    return Reference(mu, sigma, features, str(cache))


def _reference_key(config: ml_collections.ConfigDict, extractor: FeatureExtractor) -> str:
    """Changes whenever the reference images or the feature network change."""
    import jax

    facts = {"data": config.data.to_dict(), "num_reference": int(config.eval.num_reference),
             "extractor": extractor.name, "dim": extractor.dim}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode())
    for leaf in jax.tree_util.tree_leaves(extractor.params):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()[:12]
