"""Per-image preprocessing that runs inside a grain `.map`: crop, resize, scale to [-1, 1]."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

# (uint8 HWC image of any size, target size) -> uint8 (size, size, C) image.
Fit = Callable[[np.ndarray, int], np.ndarray]


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


def preprocess_tfds_example(example: dict[str, Any], *, fit: Fit, size: int) -> np.ndarray:
    return _to_signed_unit(fit(_as_rgb(example["image"]), size))


def read_image_file(path: str, *, fit: Fit, size: int) -> np.ndarray:
    from etils import epath  # local and gs:// paths alike

    with epath.Path(path).open("rb") as file, Image.open(file) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    return _to_signed_unit(fit(pixels, size))
