"""Turning model-range images into viewable PNG grids."""

from __future__ import annotations

import math

import numpy as np
from etils import epath
from PIL import Image

from ddsm_jax.common_types import PathLike
from ddsm_jax.utils.files import write_atomically

_MIN_SIDE = 32  # save_grid upsamples until each image is at least this many pixels on a side


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats to uint8 pixels; samples overshoot the range, hence the clip."""
    pixels = (np.asarray(images, dtype=np.float32) + 1.0) * 127.5
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _as_nhwc_uint8(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:  # (N, H, W) grayscale
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C) or (N, H, W), got {images.shape}")
    return images if images.dtype == np.uint8 else to_uint8(images)


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 1, scale: int = 1,
              *, pad_value: int = 128) -> np.ndarray:
    """Tiles N images into one (H, W, C) uint8 picture, `nrow` images per row.

    Channels are kept as they are (grayscale stays one channel). `scale`
    repeats pixels (nearest neighbour) so tiny images stay crisp; the default
    grey `pad_value` separates images whose background is black or white.
    Accepts [-1, 1] floats or uint8.
    """
    images = _as_nhwc_uint8(images)
    count, height, width, channels = images.shape
    if count == 0:
        raise ValueError("make_grid needs at least one image")
    if scale < 1 or padding < 0:
        raise ValueError(f"need scale >= 1 and padding >= 0, got scale={scale}, padding={padding}")
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        height, width = height * scale, width * scale
    ncol = nrow if nrow is not None else math.ceil(math.sqrt(count))
    ncol = max(1, min(ncol, count))
    nrows = math.ceil(count / ncol)
    grid = np.full((nrows * (height + padding) + padding, ncol * (width + padding) + padding, channels),
                   pad_value, dtype=np.uint8)
    for index, image in enumerate(images):
        row, col = divmod(index, ncol)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[top:top + height, left:left + width] = image
    return grid


def save_grid(images: np.ndarray, path: PathLike, nrow: int | None = None,
              scale: int | None = None) -> epath.Path:
    """Writes `make_grid(images)` as a PNG, atomically so a crash never leaves a half-written file.

    By default each image is upsampled to at least 32 pixels on a side, so 8x8
    digits are visible.
    """
    images = _as_nhwc_uint8(images)
    if scale is None:
        scale = max(1, math.ceil(_MIN_SIDE / min(images.shape[1:3])))
    grid = make_grid(images, nrow=nrow, scale=scale)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    return write_atomically(path, lambda handle: picture.save(handle, format="PNG"))
