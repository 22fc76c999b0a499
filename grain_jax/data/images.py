"""Decoding untrusted image files to 8-bit RGB, shared by prepare, the evaluators and visualize.

``PIL.Image.convert("RGB")`` clips high-bit-depth modes instead of scaling them: a 16-bit
grayscale PNG (mode ``I;16`` or ``I``) comes out almost all white. ``to_rgb`` scales those
to 8 bits first.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# What PIL raises on a truncated, empty, fake or hostile file (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> mode RGB; 16/32-bit integer and float grayscale scaled to 0..255."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        pixels = np.asarray(image, np.uint32) >> 8
        return Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB")
    if image.mode in ("I", "F"):
        pixels = np.asarray(image, np.float64)
        if image.mode == "I" and pixels.max(initial=0) > 255:  # 16-bit data decoded as 32-bit ints
            pixels = pixels / 257.0
        elif image.mode == "F" and pixels.max(initial=0) <= 1.0:  # float images in [0, 1]
            pixels = pixels * 255.0
        return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL wants palette transparency resolved through RGBA
    return image.convert("RGB")


def read_rgb(path: str) -> np.ndarray:
    """uint8 [H, W, 3] of an image file; raises one of ``DECODE_ERRORS`` if it cannot be decoded."""
    with Image.open(path) as image:
        image.load()  # decode now: a truncated file fails here
        return np.asarray(to_rgb(image))
