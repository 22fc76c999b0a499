"""Fixed-size batches: every jitted call sees one shape (zero padding, results sliced back)."""
from __future__ import annotations

from typing import Iterator

import numpy as np


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_to(x: np.ndarray, size: int) -> np.ndarray:
    """Pads axis 0 of ``x`` with zeros up to ``size`` (a no-op when already that long)."""
    if x.shape[0] > size:
        raise ValueError(f"cannot pad {x.shape[0]} rows down to {size}")
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.zeros((size - x.shape[0],) + x.shape[1:], x.dtype)])


def fixed_size_batches(x: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Yields ``(chunk padded to batch_size, number of real rows)`` so jit sees one shape."""
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size]
        yield pad_to(chunk, batch_size), chunk.shape[0]
