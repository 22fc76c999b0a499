"""The batch contract between the input pipeline, the model and the losses.

One training batch is a dict of arrays (numpy on the host, ``jax.Array`` placed with
``sharding.batch_sharding`` on device), B = batch size, M = max boxes (5),
Lc / Ld = caption / description context lengths (each at most 77, may differ):

| key                  | shape / dtype            | meaning                                                    |
|----------------------|--------------------------|------------------------------------------------------------|
| `images`             | [B, H, W, 3] uint8       | squash-resized RGB pixels (normalised on device)           |
| `caption_tokens`     | [B, Lc] int32            | CLIP BPE ids, SOT ... EOT, zero padded                      |
| `description_tokens` | [B, M, Ld] int32         | description m of image b belongs to box m                   |
| `boxes`              | [B, M, 4] float32        | cxcywh in [0, 1] of the (squashed) image                    |
| `box_mask`           | [B, M] bool              | True where box m *and* its description are valid           |

Images travel as uint8 (a quarter of float32's host-to-device bytes); the jitted step,
the evaluators and inference turn them into model input with
``grain_jax.data.transforms.normalize(images, mean, std)`` (``config.data.mean/std``,
ImageNet's by default), so training and serving see identical pixels.

Valid boxes/descriptions are packed in the first slots (top-k by score, then
padding); padded slots have all-zero tokens and boxes. Eval batches may also
carry `mask` [B] bool (False = padding example, never counted).
"""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

TRAIN_KEYS = ("images", "caption_tokens", "description_tokens", "boxes", "box_mask")


def validate(batch: Mapping[str, np.ndarray]) -> None:
    """Raises ValueError naming the key if ``batch`` breaks the contract above."""
    missing = [k for k in TRAIN_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing keys {missing}; has {sorted(batch)}")
    b = batch["images"].shape[0]
    if batch["images"].ndim != 4 or batch["images"].shape[-1] != 3 or batch["images"].dtype != np.uint8:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {batch['images'].dtype} {batch['images'].shape}")
    m = batch["box_mask"].shape[-1]
    expect = {
        "caption_tokens": 2, "description_tokens": 3, "boxes": 3, "box_mask": 2,
    }
    for key, ndim in expect.items():
        shape = batch[key].shape
        if len(shape) != ndim or shape[0] != b:
            raise ValueError(f"{key} must have {ndim} dims and batch {b}, got {shape}")
    if batch["description_tokens"].shape[1] != m or batch["boxes"].shape[1:] != (m, 4):
        raise ValueError(f"description_tokens {batch['description_tokens'].shape} / boxes {batch['boxes'].shape} "
                         f"disagree with box_mask {batch['box_mask'].shape}")


def abstract_batch(batch_size: int, image_size: int, caption_length: int, description_length: int,
                   max_boxes: int, sharding: jax.sharding.Sharding | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The contract's training batch as ``jax.ShapeDtypeStruct``s (AOT compiles), all placed with ``sharding``."""
    b, m = batch_size, max_boxes
    shapes = {
        "images": ((b, image_size, image_size, 3), np.uint8),
        "caption_tokens": ((b, caption_length), np.int32),
        "description_tokens": ((b, m, description_length), np.int32),
        "boxes": ((b, m, 4), np.float32),
        "box_mask": ((b, m), np.bool_),
    }
    return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for key, (shape, dtype) in shapes.items()}


def fake_batch(batch_size: int = 4, image_size: int = 32, caption_length: int = 16,
               description_length: int = 8, max_boxes: int = 5, seed: int = 0,
               vocab_size: int = 49408) -> dict[str, np.ndarray]:
    """A random batch that satisfies the contract (for tests and benchmarks)."""
    rng = np.random.default_rng(seed)

    def tokens(shape, length):
        n = rng.integers(1, length - 1, size=shape)  # content length per text
        ids = rng.integers(1, min(vocab_size - 2, 49406), size=shape + (length,))
        pos = np.arange(length)
        ids = np.where(pos < n[..., None] + 1, ids, 0)
        ids[..., 0] = min(49406, vocab_size - 2)
        np.put_along_axis(ids, (n + 1)[..., None], min(49407, vocab_size - 1), axis=-1)
        return ids.astype(np.int32)

    n_valid = rng.integers(0, max_boxes + 1, size=batch_size)
    box_mask = np.arange(max_boxes)[None] < n_valid[:, None]
    centre = rng.uniform(0.25, 0.75, size=(batch_size, max_boxes, 2))
    size = rng.uniform(0.05, 0.45, size=(batch_size, max_boxes, 2))
    boxes = np.concatenate([centre, size], -1).astype(np.float32) * box_mask[..., None]
    desc = tokens((batch_size, max_boxes), description_length) * box_mask[..., None]
    return {
        "images": rng.integers(0, 256, size=(batch_size, image_size, image_size, 3), dtype=np.uint8),
        "caption_tokens": tokens((batch_size,), caption_length),
        "description_tokens": desc.astype(np.int32),
        "boxes": boxes,
        "box_mask": box_mask,
    }
