"""The FID Inception-v3 network: 2048-d pool3 features, as pytorch-fid computes them.

FID numbers are only comparable when they come from the same network as everybody else's: the
2015-12-05 TensorFlow Inception graph that pytorch-fid ports (`use_fid_inception=True`). It is
torchvision's Inception-v3 with TF's quirks, which this module keeps:

- every conv is conv (no bias) -> BatchNorm (eval mode, eps 1e-3) -> ReLU;
- the average pools inside the A, C and first E blocks do not count the padding;
- the last E block (Mixed_7c) pools its pool branch with a *max* pool;
- inputs are resized to 299x299 with torch's bilinear `align_corners=False` (no antialiasing).

The network is a pure function `apply(params, images)` over a nested dict of arrays, so it jits,
shards over a batch axis, and plugs into `FeatureExtractor`. The weights come from pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, converted once to `.npz` by
`python -m ddsm_jax.eval.convert_inception` (README, Evaluation).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddsm_jax.common_types import Params
from ddsm_jax.eval.features import FeatureExtractor

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3
TORCH_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
CONVERT_COMMAND = ("python -m ddsm_jax.eval.convert_inception "
                   f"--pth={TORCH_WEIGHTS_NAME} --out=inception_fid.npz")

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Architecture as data: every conv's kernel shape (kh, kw, c_in, c_out), by "block/conv" name.
# --------------------------------------------------------------------------------------------

def _block_a(c_in: int, pool_features: int) -> dict[str, tuple[int, int, int, int]]:
    return {"branch1x1": (1, 1, c_in, 64),
            "branch5x5_1": (1, 1, c_in, 48), "branch5x5_2": (5, 5, 48, 64),
            "branch3x3dbl_1": (1, 1, c_in, 64), "branch3x3dbl_2": (3, 3, 64, 96),
            "branch3x3dbl_3": (3, 3, 96, 96),
            "branch_pool": (1, 1, c_in, pool_features)}


def _block_b(c_in: int) -> dict[str, tuple[int, int, int, int]]:
    return {"branch3x3": (3, 3, c_in, 384),
            "branch3x3dbl_1": (1, 1, c_in, 64), "branch3x3dbl_2": (3, 3, 64, 96),
            "branch3x3dbl_3": (3, 3, 96, 96)}


def _block_c(c_in: int, c7: int) -> dict[str, tuple[int, int, int, int]]:
    return {"branch1x1": (1, 1, c_in, 192),
            "branch7x7_1": (1, 1, c_in, c7), "branch7x7_2": (1, 7, c7, c7),
            "branch7x7_3": (7, 1, c7, 192),
            "branch7x7dbl_1": (1, 1, c_in, c7), "branch7x7dbl_2": (7, 1, c7, c7),
            "branch7x7dbl_3": (1, 7, c7, c7), "branch7x7dbl_4": (7, 1, c7, c7),
            "branch7x7dbl_5": (1, 7, c7, 192),
            "branch_pool": (1, 1, c_in, 192)}


def _block_d(c_in: int) -> dict[str, tuple[int, int, int, int]]:
    return {"branch3x3_1": (1, 1, c_in, 192), "branch3x3_2": (3, 3, 192, 320),
            "branch7x7x3_1": (1, 1, c_in, 192), "branch7x7x3_2": (1, 7, 192, 192),
            "branch7x7x3_3": (7, 1, 192, 192), "branch7x7x3_4": (3, 3, 192, 192)}


def _block_e(c_in: int) -> dict[str, tuple[int, int, int, int]]:
    return {"branch1x1": (1, 1, c_in, 320),
            "branch3x3_1": (1, 1, c_in, 384), "branch3x3_2a": (1, 3, 384, 384),
            "branch3x3_2b": (3, 1, 384, 384),
            "branch3x3dbl_1": (1, 1, c_in, 448), "branch3x3dbl_2": (3, 3, 448, 384),
            "branch3x3dbl_3a": (1, 3, 384, 384), "branch3x3dbl_3b": (3, 1, 384, 384),
            "branch_pool": (1, 1, c_in, 192)}


def conv_shapes() -> dict[str, tuple[int, int, int, int]]:
    """Kernel shape (HWIO) of every conv, keyed "Conv2d_1a_3x3" or "Mixed_5b/branch1x1"."""
    stem = {"Conv2d_1a_3x3": (3, 3, 3, 32), "Conv2d_2a_3x3": (3, 3, 32, 32),
            "Conv2d_2b_3x3": (3, 3, 32, 64), "Conv2d_3b_1x1": (1, 1, 64, 80),
            "Conv2d_4a_3x3": (3, 3, 80, 192)}
    blocks = {"Mixed_5b": _block_a(192, 32), "Mixed_5c": _block_a(256, 64),
              "Mixed_5d": _block_a(288, 64), "Mixed_6a": _block_b(288),
              "Mixed_6b": _block_c(768, 128), "Mixed_6c": _block_c(768, 160),
              "Mixed_6d": _block_c(768, 160), "Mixed_6e": _block_c(768, 192),
              "Mixed_7a": _block_d(768), "Mixed_7b": _block_e(1280), "Mixed_7c": _block_e(2048)}
    shapes = dict(stem)
    for block, convs in blocks.items():
        shapes.update({f"{block}/{conv}": shape for conv, shape in convs.items()})
    return shapes


def param_shapes() -> dict[str, tuple[int, ...]]:
    """Every flat `.npz` key and its shape: per conv a kernel and its BatchNorm's four vectors."""
    shapes = {}
    for name, kernel in conv_shapes().items():
        shapes[f"{name}/conv/kernel"] = kernel
        for field in ("scale", "bias", "mean", "var"):
            shapes[f"{name}/bn/{field}"] = (kernel[-1],)
    return shapes


def unflatten(flat: Mapping[str, Any]) -> Params:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    tree: Params = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def check_flat_params(flat: Mapping[str, Any], source: str,
                      hint: str = f"make the file with `{CONVERT_COMMAND}`") -> None:
    """Raises ValueError naming `source` (and `hint`) unless `flat` has exactly our keys and
    shapes: a wrong file fails here, with every problem listed, not deep inside `apply`."""
    expected = param_shapes()
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    misshaped = [f"{key} {tuple(np.shape(flat[key]))} != {expected[key]}"
                 for key in expected if key in flat and tuple(np.shape(flat[key])) != expected[key]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if misshaped:
        problems.append(f"{len(misshaped)} misshaped (e.g. {'; '.join(misshaped[:3])})")
    if problems:
        raise ValueError(f"{source} is not FID Inception weights: {', '.join(problems)} keys; "
                         f"{hint}")


def load_inception_params(path: str | os.PathLike) -> Params:
    """The weights in our `.npz` (flat "Mixed_5b/branch1x1/conv/kernel" keys) as a nested dict.

    Every way of pointing at the wrong file (none there, the PyTorch `.pth` itself, some other
    `.npz`) is one clear error naming the file and the command that makes the right one.
    """
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights {path} not found; convert pytorch-fid's "
                                f"weights with `{CONVERT_COMMAND}` (README, Evaluation)")
    try:
        with path.open("rb") as handle:
            if not zipfile.is_zipfile(handle):  # what np.savez writes; np.load would try pickle
                raise ValueError(f"{path} is not an .npz archive; make the FID Inception weights "
                                 f"with `{CONVERT_COMMAND}`")
            with zipfile.ZipFile(handle) as archive:
                if any(name.endswith("data.pkl") for name in archive.namelist()):
                    raise ValueError(f"{path} is a PyTorch checkpoint, not our .npz; convert it "
                                     f"with `{CONVERT_COMMAND}`")
            handle.seek(0)
            with np.load(handle, allow_pickle=False) as loaded:
                flat = {key: np.asarray(loaded[key], dtype=np.float32) for key in loaded.files}
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"cannot read FID Inception weights from {path} ({error}); make the file "
                         f"with `{CONVERT_COMMAND}`") from error
    check_flat_params(flat, path)
    return unflatten(flat)


def random_inception_params(seed: int) -> Params:
    """Random weights of the right shapes (tests, benchmarks), with BatchNorm statistics that
    are not the identity, so a BN bug shows. He-scaled kernels keep activations O(1)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, (kh, kw, c_in, c_out) in conv_shapes().items():
        flat[f"{name}/conv/kernel"] = rng.normal(
            0.0, np.sqrt(2.0 / (kh * kw * c_in)), (kh, kw, c_in, c_out)).astype(np.float32)
        flat[f"{name}/bn/scale"] = rng.uniform(0.5, 1.5, c_out).astype(np.float32)
        flat[f"{name}/bn/bias"] = rng.normal(0.0, 0.2, c_out).astype(np.float32)
        flat[f"{name}/bn/mean"] = rng.normal(0.0, 0.2, c_out).astype(np.float32)
        flat[f"{name}/bn/var"] = rng.uniform(0.5, 1.5, c_out).astype(np.float32)
    return unflatten(flat)


# --------------------------------------------------------------------------------------------
# Resize: torch's F.interpolate(mode="bilinear", align_corners=False, antialias=False).
# --------------------------------------------------------------------------------------------

def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) float32 weights of torch's 1-D linear interpolation.

    Half-pixel centres: output i samples input coordinate (i + 0.5) * size_in / size_out - 0.5,
    clamped below at 0, between floor and floor + 1 (clamped at the last pixel). No
    antialiasing, so downsampling skips pixels exactly as torch does (jax.image.resize would
    average them). The rounding is torch's CPU kernel's too (a float32 scale, the coordinate in
    double, rounded to float32, the fraction in float32), so the weights equal torch's bit for
    bit; the tests check that on large sizes, where a float32 coordinate would be off by 1e-5.
    """
    scale = np.float32(size_in) / np.float32(size_out)
    out = np.arange(size_out, dtype=np.float64)
    src = ((out + 0.5) * np.float64(scale) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    lower = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    upper = np.minimum(lower + 1, size_in - 1)
    frac = src - lower.astype(np.float32)
    weights = np.zeros((size_out, size_in), np.float32)
    rows = np.arange(size_out)
    np.add.at(weights, (rows, lower), np.float32(1.0) - frac)
    np.add.at(weights, (rows, upper), frac)
    return weights


def resize_bilinear(images: jax.Array, height: int, width: int) -> jax.Array:
    """NHWC images resized as torch's bilinear interpolate (align_corners=False) does.

    Separable: two small matmuls with static weight matrices, jit- and shard-friendly.
    """
    if images.shape[1:3] == (height, width):
        return images  # torch's weights are the identity then
    rows = jnp.asarray(bilinear_matrix(images.shape[1], height))
    cols = jnp.asarray(bilinear_matrix(images.shape[2], width))
    images = jnp.einsum("oh,nhwc->nowc", rows, images, precision=_HIGHEST)
    return jnp.einsum("pw,nowc->nopc", cols, images, precision=_HIGHEST)


# --------------------------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------------------------

def _conv_bn_relu(p: Params, x: jax.Array, stride: int = 1,
                  padding: str = "SAME") -> jax.Array:
    """BasicConv2d: conv without bias, eval-mode BatchNorm (eps 1e-3), ReLU.

    "SAME" at stride 1 with the odd kernels here pads k // 2 on each side, as torch's convs do.
    """
    y = jax.lax.conv_general_dilated(
        x, p["conv"]["kernel"], window_strides=(stride, stride), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
    bn = p["bn"]
    scale = bn["scale"] * jax.lax.rsqrt(bn["var"] + BN_EPS)
    return jax.nn.relu(y * scale + (bn["bias"] - bn["mean"] * scale))


def _max_pool(x: jax.Array, stride: int, padding: str = "VALID") -> jax.Array:
    """3x3 max pool; padding (torch's padding=1) never wins, like torch's -inf padding."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 padding)


def _avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1 average that divides by the in-image count (TF's pooling;
    torch's count_include_pad=False): border outputs average 4 or 6 pixels, not 9."""
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, "SAME")
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, "SAME")
    return total / count


def _mixed_a(p: Params, x: jax.Array) -> jax.Array:
    b1 = _conv_bn_relu(p["branch1x1"], x)
    b5 = _conv_bn_relu(p["branch5x5_2"], _conv_bn_relu(p["branch5x5_1"], x))
    b3 = _conv_bn_relu(p["branch3x3dbl_1"], x)
    b3 = _conv_bn_relu(p["branch3x3dbl_3"], _conv_bn_relu(p["branch3x3dbl_2"], b3))
    bp = _conv_bn_relu(p["branch_pool"], _avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


def _mixed_b(p: Params, x: jax.Array) -> jax.Array:
    b3 = _conv_bn_relu(p["branch3x3"], x, stride=2, padding="VALID")
    bd = _conv_bn_relu(p["branch3x3dbl_2"], _conv_bn_relu(p["branch3x3dbl_1"], x))
    bd = _conv_bn_relu(p["branch3x3dbl_3"], bd, stride=2, padding="VALID")
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


def _mixed_c(p: Params, x: jax.Array) -> jax.Array:
    b1 = _conv_bn_relu(p["branch1x1"], x)
    b7 = x
    for name in ("branch7x7_1", "branch7x7_2", "branch7x7_3"):
        b7 = _conv_bn_relu(p[name], b7)
    bd = x
    for i in range(1, 6):
        bd = _conv_bn_relu(p[f"branch7x7dbl_{i}"], bd)
    bp = _conv_bn_relu(p["branch_pool"], _avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


def _mixed_d(p: Params, x: jax.Array) -> jax.Array:
    b3 = _conv_bn_relu(p["branch3x3_1"], x)
    b3 = _conv_bn_relu(p["branch3x3_2"], b3, stride=2, padding="VALID")
    b7 = x
    for name in ("branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3"):
        b7 = _conv_bn_relu(p[name], b7)
    b7 = _conv_bn_relu(p["branch7x7x3_4"], b7, stride=2, padding="VALID")
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


def _mixed_e(p: Params, x: jax.Array, *, max_pool: bool) -> jax.Array:
    """Mixed_7b pools its pool branch by an average (padding not counted), Mixed_7c by a max:
    a bug in the TF graph that FID has kept ever since."""
    b1 = _conv_bn_relu(p["branch1x1"], x)
    b3 = _conv_bn_relu(p["branch3x3_1"], x)
    b3 = jnp.concatenate([_conv_bn_relu(p["branch3x3_2a"], b3),
                          _conv_bn_relu(p["branch3x3_2b"], b3)], axis=-1)
    bd = _conv_bn_relu(p["branch3x3dbl_2"], _conv_bn_relu(p["branch3x3dbl_1"], x))
    bd = jnp.concatenate([_conv_bn_relu(p["branch3x3dbl_3a"], bd),
                          _conv_bn_relu(p["branch3x3dbl_3b"], bd)], axis=-1)
    pooled = _max_pool(x, 1, "SAME") if max_pool else _avg_pool_exclude_pad(x)
    bp = _conv_bn_relu(p["branch_pool"], pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def apply(params: Params, images: jax.Array) -> jax.Array:
    """(N, 2048) pool3 features of float32 NHWC `images` in [-1, 1], any size, 1 or 3 channels.

    Equals pytorch-fid's `InceptionV3([3])` on the same images mapped to [0, 1] in NCHW: its
    resize-then-normalise and our resize of [-1, 1] agree because bilinear weights sum to 1.
    Every conv and matmul runs at full float32 precision (on TPU the default would be bfloat16
    passes, which moves FID).
    """
    chex.assert_rank(images, 4)
    chex.assert_type(images, float)  # uint8 would silently give features of [0, 255]
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (NHWC), got shape {images.shape}")
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = resize_bilinear(x, INPUT_SIZE, INPUT_SIZE)
    x = _conv_bn_relu(params["Conv2d_1a_3x3"], x, stride=2, padding="VALID")
    x = _conv_bn_relu(params["Conv2d_2a_3x3"], x, padding="VALID")
    x = _max_pool(_conv_bn_relu(params["Conv2d_2b_3x3"], x), 2)
    x = _conv_bn_relu(params["Conv2d_3b_1x1"], x, padding="VALID")
    x = _max_pool(_conv_bn_relu(params["Conv2d_4a_3x3"], x, padding="VALID"), 2)
    chex.assert_shape(x, (images.shape[0], 35, 35, 192))
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _mixed_a(params[name], x)
    x = _mixed_b(params["Mixed_6a"], x)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _mixed_c(params[name], x)
    chex.assert_shape(x, (images.shape[0], 17, 17, 768))
    x = _mixed_d(params["Mixed_7a"], x)
    x = _mixed_e(params["Mixed_7b"], x, max_pool=False)
    x = _mixed_e(params["Mixed_7c"], x, max_pool=True)
    chex.assert_shape(x, (images.shape[0], 8, 8, FEATURE_DIM))
    return jnp.mean(x, axis=(1, 2))


def inception_extractor(path: str | os.PathLike) -> FeatureExtractor:
    """The FID feature network with the converted weights at `path` ("inception_pool3", 2048)."""
    return inception_extractor_from_params(load_inception_params(path))


def inception_extractor_from_params(params: Params) -> FeatureExtractor:
    """As `inception_extractor`, from weights already in memory (e.g. random ones in tests)."""
    params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), params)
    return FeatureExtractor(name="inception_pool3", dim=FEATURE_DIM, params=params,
                            apply_fn=apply)
