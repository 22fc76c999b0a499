"""On-device Hungarian matching of predicted boxes to ground-truth boxes.

Following the reference (DETR's ``HungarianMatcher`` with the class term
excluded), the cost of assigning query q to target t is

    C[q, t] = l1_weight * ||b_q - b_t||_1 (cxcywh)  -  giou_weight * GIoU(b_q, b_t)
              [ - similarity_weight * cos(region_q, description_t) ]   (optional)

and one assignment per image is solved with ``optax.assignment.hungarian_algorithm``
(pure JAX, so it runs inside the jitted train step, vmapped over the batch, with
no host round trip). Everything here is under ``stop_gradient``: the matching
only chooses which pairs the losses compare.

Padded target slots get a finite cost larger than every real entry of their
image. That is enough to keep them out of the assignment whenever enough real
targets exist (any pair using a padded target could be swapped for a free real
one at lower cost), and unlike a huge constant it keeps the solver's fp32
potentials well conditioned.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from grain_jax.losses import boxes as box_lib
from grain_jax.losses.contrastive import l2_normalize

# Cap for NaN/inf costs (diverged predictions); real costs are O(10).
_MAX_COST = 1e4


class Matches(NamedTuple):
    """Matched pairs per image, K = min(num_queries, max_targets) slots each.

    Attributes:
      query_index: [B, K] int32 index into the predictions (queries).
      target_index: [B, K] int32 index into the targets (box slots).
      valid: [B, K] bool; False where the pair uses a padded target slot.
    """
    query_index: jax.Array
    target_index: jax.Array
    valid: jax.Array


def matching_cost(pred_boxes: jax.Array, target_boxes: jax.Array, *, l1_weight: float, giou_weight: float,
                  region_embeddings: jax.Array | None = None, description_embeddings: jax.Array | None = None,
                  similarity_weight: float = 0.0) -> jax.Array:
    """The assignment cost of every (query, target) pair.

    Args:
      pred_boxes: [B, Q, 4] cxcywh in [0, 1].
      target_boxes: [B, M, 4] cxcywh in [0, 1].
      l1_weight, giou_weight: weights of the L1 and (negative) GIoU terms.
      region_embeddings: [B, Q, D], only needed when ``similarity_weight != 0``.
      description_embeddings: [B, M, D], only needed when ``similarity_weight != 0``.
      similarity_weight: weight of the negative cosine similarity between a
        query's region embedding and a target's description embedding.

    Returns:
      [B, Q, M] fp32 cost (padded targets not yet masked).
    """
    pred_boxes = jnp.asarray(pred_boxes, jnp.float32)
    target_boxes = jnp.asarray(target_boxes, jnp.float32)
    l1 = jnp.abs(pred_boxes[:, :, None, :] - target_boxes[:, None, :, :]).sum(-1)
    giou = box_lib.pairwise_generalized_iou(box_lib.cxcywh_to_xyxy(pred_boxes), box_lib.cxcywh_to_xyxy(target_boxes))
    cost = l1_weight * l1 - giou_weight * giou
    if similarity_weight:
        if region_embeddings is None or description_embeddings is None:
            raise ValueError("similarity_weight != 0 needs region_embeddings and description_embeddings")
        similarity = jnp.einsum("bqd,bmd->bqm", l2_normalize(region_embeddings), l2_normalize(description_embeddings))
        cost = cost - similarity_weight * similarity
    return cost


def _solve_one(cost: jax.Array, target_mask: jax.Array) -> Matches:
    """[Q, M] cost, [M] bool mask -> Matches with [K] fields."""
    cost = jnp.clip(jnp.nan_to_num(cost, nan=_MAX_COST), -_MAX_COST, _MAX_COST)
    padding_cost = jnp.max(jnp.where(target_mask[None, :], cost, 0.0)) + 1.0
    cost = jnp.where(target_mask[None, :], cost, padding_cost)
    query_index, target_index = optax.assignment.hungarian_algorithm(cost)
    query_index = query_index.astype(jnp.int32)
    target_index = target_index.astype(jnp.int32)
    return Matches(query_index, target_index, target_mask[target_index])


def hungarian_match(cost: jax.Array, target_mask: jax.Array) -> Matches:
    """Minimum-cost one-to-one assignment per image.

    Args:
      cost: [B, Q, M] cost of matching query q to target m.
      target_mask: [B, M] bool, True for real targets.

    Returns:
      ``Matches`` with [B, min(Q, M)] fields. Every real target is matched when
      Q >= number of real targets; otherwise the Q queries all go to real targets.
    """
    if cost.ndim != 3 or target_mask.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(f"cost must be [B, Q, M] and target_mask [B, M], got {cost.shape} and {target_mask.shape}")
    cost = jax.lax.stop_gradient(jnp.asarray(cost, jnp.float32))
    return jax.vmap(_solve_one)(cost, jnp.asarray(target_mask, bool))


def match_boxes(pred_boxes: jax.Array, target_boxes: jax.Array, target_mask: jax.Array, *, l1_weight: float = 5.0,
                giou_weight: float = 2.0, region_embeddings: jax.Array | None = None,
                description_embeddings: jax.Array | None = None, similarity_weight: float = 0.0) -> Matches:
    """Matches [B, Q, 4] predictions to [B, M, 4] targets (cxcywh) with a [B, M] target mask.

    Defaults are the reference's cost weights (5 * L1 - 2 * GIoU); see ``matching_cost``.
    """
    pred_boxes, region_embeddings, description_embeddings = jax.lax.stop_gradient(
        (pred_boxes, region_embeddings, description_embeddings))
    cost = matching_cost(pred_boxes, target_boxes, l1_weight=l1_weight, giou_weight=giou_weight,
                         region_embeddings=region_embeddings, description_embeddings=description_embeddings,
                         similarity_weight=similarity_weight)
    return hungarian_match(cost, target_mask)


def gather_matched(values: jax.Array, index: jax.Array) -> jax.Array:
    """Picks matched slots: values [B, N, ...] with index [B, K] -> [B, K, ...]."""
    index = index.reshape(index.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=1)
