"""Box format conversions, IoU and generalised IoU (jnp, fp32).

Boxes are normalised to [0, 1] of the image. ``cxcywh`` = (centre x, centre y,
width, height), ``xyxy`` = (left, top, right, bottom). Every function broadcasts
over leading dimensions; the ``pairwise_*`` variants compare every box of one
set with every box of another.

Numerics follow the reference (DETR's ``box_ops``): IoU = inter / (union + 1e-4)
and GIoU = IoU - (enclose - union) / enclose with no epsilon on ``enclose``. The
only deviation is a guard for an empty enclosing box (two degenerate boxes at the
same point, e.g. two all-zero padding boxes), where the reference divides 0 / 0;
here the penalty term is 0 there, so padded slots never produce NaN values or
NaN gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# The reference adds this to the union (box_ops.box_iou) so IoU of empty boxes is 0.
IOU_EPS = 1e-4


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """[..., 4] cxcywh -> [..., 4] xyxy (fp32)."""
    cx, cy, w, h = jnp.moveaxis(jnp.asarray(boxes, jnp.float32), -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
    """[..., 4] xyxy -> [..., 4] cxcywh (fp32)."""
    x0, y0, x1, y1 = jnp.moveaxis(jnp.asarray(boxes, jnp.float32), -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
    """[..., 4] xyxy -> [...] area (negative for inverted boxes, like torchvision)."""
    boxes = jnp.asarray(boxes, jnp.float32)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _iou_and_union(boxes1: jax.Array, boxes2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Elementwise IoU and union of broadcastable [..., 4] xyxy boxes."""
    boxes1 = jnp.asarray(boxes1, jnp.float32)
    boxes2 = jnp.asarray(boxes2, jnp.float32)
    top_left = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
    overlap = jnp.clip(bottom_right - top_left, min=0.0)
    intersection = overlap[..., 0] * overlap[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - intersection
    return intersection / (union + IOU_EPS), union


def iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """Elementwise IoU of broadcastable [..., 4] xyxy boxes -> [...]."""
    return _iou_and_union(boxes1, boxes2)[0]


def generalized_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """Elementwise generalised IoU of broadcastable [..., 4] xyxy boxes -> [...] in [-1, 1]."""
    box_iou, union = _iou_and_union(boxes1, boxes2)
    boxes1 = jnp.asarray(boxes1, jnp.float32)
    boxes2 = jnp.asarray(boxes2, jnp.float32)
    enclose_size = jnp.clip(
        jnp.maximum(boxes1[..., 2:], boxes2[..., 2:]) - jnp.minimum(boxes1[..., :2], boxes2[..., :2]), min=0.0)
    enclose = enclose_size[..., 0] * enclose_size[..., 1]
    # Double-where so the unused branch cannot put NaN into the gradient.
    nonempty = enclose > 0
    penalty = jnp.where(nonempty, (enclose - union) / jnp.where(nonempty, enclose, 1.0), 0.0)
    return box_iou - penalty


def pairwise_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """IoU of every pair: [..., N, 4] x [..., M, 4] xyxy -> [..., N, M]."""
    return iou(boxes1[..., :, None, :], boxes2[..., None, :, :])


def pairwise_generalized_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """GIoU of every pair: [..., N, 4] x [..., M, 4] xyxy -> [..., N, M]."""
    return generalized_iou(boxes1[..., :, None, :], boxes2[..., None, :, :])
