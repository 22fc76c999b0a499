"""The one image preprocessing of training and serving: squash-resize (bicubic) and mean/std normalise.

The input pipeline (``pipeline.py``) and inference (``grain_jax.inference``) both call ``preprocess``,
so a model is served exactly the pixels it was trained on.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def squash_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3], bicubic, aspect ratio not kept (as prepare stores them)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 (x / 255 - mean) / std.

    Computed in place on [H, W*3] rows against the per-channel factors tiled W times:
    numpy broadcasting over a trailing axis of 3 is about 7x slower, and at 224 px this
    is most of the per-record cost.
    """
    height, width, channels = image.shape
    std = np.asarray(std, np.float32)
    rows = image.astype(np.float32).reshape(height, width * channels)
    rows *= np.tile(1.0 / (255.0 * std), width)
    rows += np.tile(-np.asarray(mean, np.float32) / std, width)
    return rows.reshape(height, width, channels)


def preprocess(image: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3]: ``squash_resize`` then ``normalize``."""
    return normalize(squash_resize(image, size), mean, std)
