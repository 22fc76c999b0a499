"""Image preprocessing shared by training, evaluation and serving, so all see identical pixels.

Host side, images stay uint8 (a quarter of float32's bytes to move and to transfer):
``decode_image`` and ``squash_resize`` are the only host transforms. Device side, ``normalize`` turns uint8
pixels into the model's input inside the jitted step or encoder; it is the one place where
``(x / 255 - mean) / std`` is written.
"""
from __future__ import annotations

import io
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data: bytes, name: str | bytes = "") -> np.ndarray:
    """Encoded image bytes (JPEG/PNG) -> uint8 [H, W, 3] RGB; ValueError naming ``name`` if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for truncated / foreign bytes
        name = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        raise ValueError(f"record {name!r}: cannot decode its image ({type(e).__name__}: {e})") from e


def squash_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3], bicubic, aspect ratio not kept (as prepare stores them)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validated per-channel (mean, std) as tuples; raises ValueError naming the bad one."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    for name, value in (("mean", mean), ("std", std)):
        if len(value) != 3:
            raise ValueError(f"data.{name} must have 3 entries (RGB), got {value!r}")
    if min(std) <= 0:
        raise ValueError(f"data.std must be positive, got {std!r}")
    return mean, std


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """uint8 [..., H, W, 3] -> ``dtype`` ``(x / 255 - mean) / std`` (computed in fp32).

    Float input is returned unchanged (cast to ``dtype``): callers may pass pixels that are
    already normalised (e.g. CLIP_benchmark's torch transforms of other models).
    """
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8:
        return images.astype(dtype)
    mean, std = check_mean_std(mean, std)
    scale = np.float32(1.0 / 255.0) / np.asarray(std, np.float32)
    offset = -np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    return (images.astype(jnp.float32) * scale + offset).astype(dtype)
