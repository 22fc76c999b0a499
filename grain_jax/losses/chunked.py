"""Chunked contrastive statistics: blocks of rows, each against every column, rematerialised.

``lax.map`` walks ``num_chunks`` blocks of rows; a block's [N/num_chunks, C] logits
live only inside its iteration, and ``jax.checkpoint`` makes the backward pass
recompute them instead of saving them, so peak memory holds one block, not the
whole [N, C] matrix. Block j is rows j, j + num_chunks, ... so that, with the
rows sharded over the batch axes, every device keeps an equal share of every
block (as ``train.step`` splits micro-batches). Columns stay whole: under jit
GSPMD gathers them once, an [C, D] array, which is linear in the batch.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from grain_jax.losses import blockwise


def _split(x: jax.Array, num_chunks: int) -> jax.Array:
    """[N, ...] -> [num_chunks, N/num_chunks, ...], chunk j = rows j, j + num_chunks, ..."""
    x = x.reshape((x.shape[0] // num_chunks, num_chunks) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))


def row_statistics(rows: jax.Array, cols: jax.Array, col_valid: jax.Array, labels: jax.Array,
                   row_group: jax.Array, col_group: jax.Array, scale: jax.Array, *,
                   num_chunks: int) -> blockwise.RowStats:
    """``blockwise.RowStatistics`` in ``num_chunks`` blocks of rows (must divide N)."""
    num_rows = rows.shape[0]
    if num_chunks < 1 or num_rows % num_chunks:
        raise ValueError(f"loss.contrastive_chunks={num_chunks} must be >= 1 and divide the number of "
                         f"contrastive rows {num_rows}")
    col_index = jnp.arange(cols.shape[0], dtype=jnp.int32)

    @jax.checkpoint
    def one_chunk(chunk):
        chunk_rows, chunk_labels, chunk_groups, chunk_scale = chunk
        return blockwise.block_statistics(chunk_rows, cols, col_valid, chunk_labels, col_index, chunk_groups,
                                          col_group, chunk_scale)

    chunks = tuple(_split(x, num_chunks) for x in (rows, labels, row_group, scale))
    stats = jax.lax.map(one_chunk, chunks)
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(num_rows), stats)
