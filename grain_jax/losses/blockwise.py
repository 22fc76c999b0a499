"""L_ic and L_rd written over row statistics, so the [rows, columns] logits never need to exist whole.

Every contrastive term here is a masked softmax cross-entropy of a row against a
set of columns, CE = logsumexp(row logits) - positive logit. The positive column
always lives next to its row (caption b and the descriptions of image b sit in the
same batch slot as image b / its regions), so it is a cheap row-wise dot product;
only the log-sum-exp needs every column. ``chunked.py`` (blocks of rows, remat)
and ``ring.py`` (shard_map + ppermute) compute it with bounded memory as a
``RowStatistics`` function; the losses below are the same for both and equal the
dense ones in ``contrastive.py`` (which stay the parity reference).

Columns are masked exactly as in ``contrastive.py``: an invalid column (padded
description slot, padded eval example) or a column of another negative group gets
the logit ``MASKED_LOGIT`` (its exp underflows to 0 next to any real logit). Rows
whose pair is invalid get a finite value and weight 0.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from grain_jax.losses.contrastive import MASKED_LOGIT, l2_normalize, masked_mean

PRECISION = jax.lax.Precision.HIGHEST  # as contrastive.py: true fp32 similarity matmuls


class RowStats(NamedTuple):
    """Per-row results over all (allowed) columns, [N] fp32 each.

    lse: log-sum-exp of the masked logits (the differentiable part).
    best_before / best_after: the largest logit among the columns whose global
      index is below / above the row's label (-inf if none); the label wins
      ``argmax`` (first index on ties) iff positive > best_before and
      positive >= best_after.
    """
    lse: jax.Array
    best_before: jax.Array
    best_after: jax.Array


# (rows [N, D], cols [C, D], col_valid [C], labels [N], row_group [N], col_group [C], scale [N]) -> RowStats;
# rows/cols are L2-normalised fp32, labels are global column indices, scale is per row (see ``block_statistics``).
RowStatistics = Callable[..., RowStats]


def block_logits(rows: jax.Array, cols: jax.Array, col_valid: jax.Array, row_group: jax.Array,
                 col_group: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked logits of a block: rows [n, D] x cols [c, D] -> (logits [n, c], allowed [n, c] bool)."""
    logits = scale[:, None] * jnp.einsum("nd,cd->nc", rows, cols, precision=PRECISION)
    allowed = col_valid[None, :] & (row_group[:, None] == col_group[None, :])
    return jnp.where(allowed, logits, MASKED_LOGIT), allowed


def block_statistics(rows: jax.Array, cols: jax.Array, col_valid: jax.Array, labels: jax.Array,
                     col_index: jax.Array, row_group: jax.Array, col_group: jax.Array,
                     scale: jax.Array) -> RowStats:
    """``RowStats`` of rows [n, D] against one block of columns [c, D] whose global indices are ``col_index`` [c].

    ``scale`` is per row ([n], all equal to exp(logit_scale)): then its gradient is
    a per-row sum, which keeps a shard_map'ed computation free of replicated inputs.
    """
    logits, _ = block_logits(rows, cols, col_valid, row_group, col_group, scale)
    lse = jax.nn.logsumexp(logits, axis=-1)
    logits = jax.lax.stop_gradient(logits)
    before = col_index[None, :] < labels[:, None]
    after = col_index[None, :] > labels[:, None]
    best_before = jnp.max(jnp.where(before, logits, -jnp.inf), axis=-1)
    best_after = jnp.max(jnp.where(after, logits, -jnp.inf), axis=-1)
    return RowStats(lse, best_before, best_after)


def combine(a: RowStats, b: RowStats) -> RowStats:
    """Statistics over the union of two disjoint column sets (the streaming log-sum-exp)."""
    return RowStats(jnp.logaddexp(a.lse, b.lse), jnp.maximum(a.best_before, b.best_before),
                    jnp.maximum(a.best_after, b.best_after))


def _cross_entropy_and_hits(stats: RowStats, positive: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row CE and top-1 hit (``argmax == label`` with argmax's first-index tie rule)."""
    stopped = jax.lax.stop_gradient(positive)
    hits = (stopped > stats.best_before) & (stopped >= stats.best_after)
    return stats.lse - positive, hits


def image_caption_loss(image_embeddings: jax.Array, caption_embeddings: jax.Array, scale: jax.Array,
                       example_mask: jax.Array | None, statistics: RowStatistics) -> tuple[jax.Array, jax.Array]:
    """``contrastive.image_caption_loss`` (same arguments and results) from a ``RowStatistics`` function."""
    batch_size = image_embeddings.shape[0]
    if example_mask is None:
        example_mask = jnp.ones((batch_size,), bool)
    images, captions = l2_normalize(image_embeddings), l2_normalize(caption_embeddings)
    row_scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (batch_size,))
    positive = row_scale * jnp.sum(images * captions, axis=-1)
    index = jnp.arange(batch_size)
    no_groups = jnp.zeros((batch_size,), jnp.int32)
    image_to_text, hits = _cross_entropy_and_hits(
        statistics(images, captions, example_mask, index, no_groups, no_groups, row_scale), positive)
    text_to_image, _ = _cross_entropy_and_hits(
        statistics(captions, images, example_mask, index, no_groups, no_groups, row_scale), positive)
    loss = 0.5 * (masked_mean(image_to_text, example_mask) + masked_mean(text_to_image, example_mask))
    return loss, masked_mean(hits.astype(jnp.float32), example_mask)


def region_description_loss(region_embeddings: jax.Array, description_embeddings: jax.Array,
                            description_mask: jax.Array, query_index: jax.Array, target_index: jax.Array,
                            pair_valid: jax.Array, scale: jax.Array, statistics: RowStatistics,
                            negative_groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """``contrastive.region_description_loss`` (same arguments and results) from a ``RowStatistics`` function.

    Rows are the B*K matched regions, columns the B*M description slots; negative
    group g holds images [g*B/G, (g+1)*B/G), and a row only sees its group's columns.
    """
    batch_size, max_descriptions = description_mask.shape
    if batch_size % negative_groups:
        raise ValueError(f"negative_groups={negative_groups} must divide the batch size {batch_size}")
    num_pairs = query_index.shape[1]
    group_of_image = jnp.arange(batch_size, dtype=jnp.int32) // (batch_size // negative_groups)

    matched = l2_normalize(jnp.take_along_axis(region_embeddings, query_index[..., None], axis=1))  # [B, K, D]
    descriptions = l2_normalize(description_embeddings)                                             # [B, M, D]
    positives = jnp.take_along_axis(descriptions, target_index[..., None], axis=1)                  # [B, K, D]
    row_scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (batch_size * num_pairs,))
    positive = row_scale * jnp.sum(matched * positives, axis=-1).reshape(-1)
    labels = (jnp.arange(batch_size)[:, None] * max_descriptions + target_index).reshape(-1)
    stats = statistics(matched.reshape(batch_size * num_pairs, -1),
                       descriptions.reshape(batch_size * max_descriptions, -1),
                       description_mask.reshape(-1), labels, jnp.repeat(group_of_image, num_pairs),
                       jnp.repeat(group_of_image, max_descriptions), row_scale)
    losses, hits = _cross_entropy_and_hits(stats, positive)
    valid = pair_valid.reshape(-1)
    return masked_mean(losses, valid), masked_mean(hits.astype(jnp.float32), valid)
