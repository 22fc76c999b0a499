"""Contrastive losses: image-caption (L_ic) and region-description (L_rd), fp32.

Both are written as plain math over the *global* batch: under ``jax.jit`` with
batch-sharded inputs, GSPMD inserts the gathers, so the negatives are all
examples of the global batch (what the reference gets from all_gather with
gradient plus DDP gradient averaging for L_ic). No ``pmean``/``psum`` anywhere.

``scale`` is the multiplier ``exp(logit_scale)`` shared by both losses.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Logit given to masked-out columns: exp() of it underflows to exactly 0 next to
# real logits (|logit| <= 100), yet it stays finite so no NaN reaches gradients.
MASKED_LOGIT = -1e9

_HIGHEST = jax.lax.Precision.HIGHEST  # similarity matmuls in true fp32 on TPU too


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis in fp32 (torch ``F.normalize``), with finite gradients at 0."""
    x = jnp.asarray(x, jnp.float32)
    squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` where ``mask``; 0 when nothing is selected."""
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def _cross_entropy_and_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row softmax CE and top-1 hit: logits [..., C], labels [...] -> ([...], [...] bool)."""
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss, jnp.argmax(logits, axis=-1) == labels


def image_caption_loss(image_embeddings: jax.Array, caption_embeddings: jax.Array, scale: jax.Array,
                       example_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Symmetric CLIP loss over the global batch.

    Args:
      image_embeddings: [B, D] unnormalised.
      caption_embeddings: [B, D] unnormalised; caption b belongs to image b.
      scale: [] the logit multiplier exp(logit_scale).
      example_mask: optional [B] bool; False rows (eval padding) are neither
        anchors nor negatives.

    Returns:
      (loss, accuracy): loss = mean of the image->text and text->image
      cross-entropies; accuracy = image->text top-1 fraction (as the reference logs).
    """
    batch_size = image_embeddings.shape[0]
    if example_mask is None:
        example_mask = jnp.ones((batch_size,), bool)
    logits = scale * jnp.einsum("id,td->it", l2_normalize(image_embeddings), l2_normalize(caption_embeddings),
                                precision=_HIGHEST)
    pair_mask = example_mask[:, None] & example_mask[None, :]
    logits = jnp.where(pair_mask, logits, MASKED_LOGIT)
    labels = jnp.arange(batch_size)
    image_to_text, hits = _cross_entropy_and_accuracy(logits, labels)
    text_to_image, _ = _cross_entropy_and_accuracy(logits.T, labels)
    loss = 0.5 * (masked_mean(image_to_text, example_mask) + masked_mean(text_to_image, example_mask))
    return loss, masked_mean(hits.astype(jnp.float32), example_mask)


def region_description_loss(region_embeddings: jax.Array, description_embeddings: jax.Array,
                            description_mask: jax.Array, query_index: jax.Array, target_index: jax.Array,
                            pair_valid: jax.Array, scale: jax.Array,
                            negative_groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of each matched region against the batch's descriptions.

    Descriptions are laid out as B*M columns (column b*M + m = description m of
    image b); the positive of the pair (query q, target t) of image b is column
    b*M + t. Invalid description columns are masked. With ``negative_groups`` = G
    the batch is split into G equal consecutive sub-batches and each region only
    sees the descriptions of its own sub-batch (a block-diagonal mask): G = number
    of data-parallel devices reproduces the reference's per-device negatives.

    Args:
      region_embeddings: [B, Q, D] unnormalised.
      description_embeddings: [B, M, D] unnormalised.
      description_mask: [B, M] bool, valid descriptions.
      query_index, target_index: [B, K] int matched pairs.
      pair_valid: [B, K] bool; only these pairs contribute.
      scale: [] the logit multiplier exp(logit_scale).
      negative_groups: G, must divide B.

    Returns:
      (loss, accuracy): means over the valid pairs (0 when there are none).
    """
    batch_size, max_descriptions = description_mask.shape
    if batch_size % negative_groups:
        raise ValueError(f"negative_groups={negative_groups} must divide the batch size {batch_size}")
    group_size = batch_size // negative_groups
    num_pairs = query_index.shape[1]

    matched = jnp.take_along_axis(region_embeddings, query_index[..., None], axis=1)        # [B, K, D]
    matched = l2_normalize(matched).reshape(negative_groups, group_size, num_pairs, -1)
    descriptions = l2_normalize(description_embeddings).reshape(negative_groups, group_size * max_descriptions, -1)
    column_mask = description_mask.reshape(negative_groups, 1, 1, group_size * max_descriptions)

    logits = scale * jnp.einsum("gbkd,gcd->gbkc", matched, descriptions, precision=_HIGHEST)
    logits = jnp.where(column_mask, logits, MASKED_LOGIT)                                   # [G, B/G, K, B/G*M]
    position_in_group = jnp.arange(batch_size) % group_size
    labels = (position_in_group[:, None] * max_descriptions + target_index).reshape(logits.shape[:-1])
    losses, hits = _cross_entropy_and_accuracy(logits, labels)
    valid = pair_valid.reshape(logits.shape[:-1])
    return masked_mean(losses, valid), masked_mean(hits.astype(jnp.float32), valid)


def global_description_loss(image_embeddings: jax.Array, description_embeddings: jax.Array,
                            description_mask: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of each region description against the batch's global image embeddings.

    Not in the reference (``LossConfig.global_description``, default 0): it teaches the global query what
    the descriptions ground in its image, each description a caption-like positive of its own image.

    Args:
      image_embeddings: [B, D] unnormalised (the global query's).
      description_embeddings: [B, M, D] unnormalised; description (b, m) belongs to image b.
      description_mask: [B, M] bool, valid descriptions (of valid examples); masked descriptions are no
        anchors, and an image none of whose descriptions is valid is still a negative.
      scale: [] the logit multiplier exp(logit_scale).

    Returns:
      (loss, accuracy): means over the valid descriptions (0 when there are none).
    """
    batch_size = image_embeddings.shape[0]
    logits = scale * jnp.einsum("bmd,id->bmi", l2_normalize(description_embeddings), l2_normalize(image_embeddings),
                                precision=_HIGHEST)                                          # [B, M, B]
    labels = jnp.broadcast_to(jnp.arange(batch_size)[:, None], description_mask.shape)
    losses, hits = _cross_entropy_and_accuracy(logits, labels)
    return masked_mean(losses, description_mask), masked_mean(hits.astype(jnp.float32), description_mask)
